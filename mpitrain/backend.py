"""The array backend: NumPy on the CPU or CuPy on this rank's GPU, chosen once per run.

Compute code receives `backend.xp` and uses only the API NumPy and CuPy share, so one code path
serves both. CuPy is imported only when a GPU is asked for or `auto` looks for one.
Each rank binds GPU `local_rank % gpu_count`, the local rank coming from an MPI shared-memory
split; several ranks may share one GPU.
"""

import ctypes
import math
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType

import numpy as np
from mpi4py import MPI

from mpitrain.comm.world import local_rank_and_size
from mpitrain.errors import MpitrainError

DEVICES = ("cpu", "gpu", "auto")


@dataclass(frozen=True)
class Backend:
    """The array module in use and, on a GPU, which device this rank computes on."""

    device: str
    xp: ModuleType
    gpu_id: int | None = None

    def synchronize(self) -> None:
        """Wait for queued GPU work; a no-op on the CPU (counted on both)."""
        HOST.syncs += 1
        if self.device == "gpu":
            self.xp.cuda.get_current_stream().synchronize()

    def describe(self) -> str:
        """'cpu (numpy)', or the GPU with its name and the CuPy and CUDA versions in use."""
        if self.device == "cpu":
            return "cpu (numpy)"
        cuda = self.xp.cuda
        name = cuda.runtime.getDeviceProperties(self.gpu_id)["name"]
        name = name.decode() if isinstance(name, bytes) else name
        runtime = cuda.runtime.runtimeGetVersion()
        aware = "CUDA-aware MPI" if cuda_aware_mpi() else "MPI staged through pinned host memory"
        return (f"gpu {self.gpu_id} ({name}; CuPy {self.xp.__version__}, CUDA runtime "
                f"{runtime // 1000}.{runtime % 1000 // 10}; {aware})")


CPU = Backend("cpu", np)


# ---------------------------------------------------------------------------- host reads, counted


@dataclass
class HostReads:
    """Device-to-host reads (each waits for the device's queued work) and explicit stream
    synchronizations made so far in this process. Counted with NumPy too, through the same calls,
    so a CPU test can assert how many a training step makes on a GPU."""

    reads: int = 0
    syncs: int = 0


HOST = HostReads()


def read_scalar(value) -> float:
    """A 0-d NumPy or CuPy value as a Python float: one counted device-to-host read."""
    HOST.reads += 1
    return float(value)


def to_host(array) -> np.ndarray:
    """A NumPy view or copy of a NumPy or CuPy array (synchronizes a device array; counted)."""
    HOST.reads += 1
    return array if isinstance(array, np.ndarray) else array.get()


# ---------------------------------------------------------------------------- device buffers and MPI


@lru_cache(maxsize=1)
def cuda_aware_mpi() -> bool:
    """Whether the MPI library in use reads and writes GPU memory itself.

    MPITRAIN_CUDA_AWARE=1 or 0 forces the answer. Otherwise MPIX_Query_cuda_support() of the
    loaded MPI library decides (MPICH >= 4.0 and Open MPI >= 4.0 export it; mpi4py 4.1 has no
    binding, so it is looked up with ctypes in the libmpi this process has mapped); a library
    without it is taken as not CUDA-aware. The PyPI MPICH wheel answers 0.
    Raises MpitrainError for another value of MPITRAIN_CUDA_AWARE."""
    forced = os.environ.get("MPITRAIN_CUDA_AWARE")
    if forced is not None:
        if forced not in ("0", "1"):
            raise MpitrainError(f"MPITRAIN_CUDA_AWARE={forced!r}: expected 0 or 1")
        return forced == "1"
    query = _mpi_symbol("MPIX_Query_cuda_support")
    return bool(query()) if query is not None else False


def _mpi_symbol(name: str):
    """`name` from the libmpi mapped into this process (through mpi4py), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libmpi" in line}
    except OSError:
        paths = set()
    for path in sorted(paths) or [None]:  # None: the process's global symbols
        try:
            function = getattr(ctypes.CDLL(path), name, None)
        except OSError:
            continue
        if function is not None:
            function.restype = ctypes.c_int
            return function
    return None


def for_mpi(array):
    """The buffer MPI may read `array` from: NumPy arrays as they are; a CuPy array itself when
    the MPI is CUDA-aware, after a stream synchronize so that MPI never reads memory the GPU is
    still writing; else a host copy (keep it alive until the send completes). NumPy arrays are
    counted as the copy a GPU would make without a CUDA-aware MPI (see HostReads)."""
    if isinstance(array, np.ndarray):
        HOST.reads += 1
        return array
    if cuda_aware_mpi():
        HOST.syncs += 1
        sys.modules["cupy"].cuda.get_current_stream().synchronize()
        return array
    return to_host(array)


def receive_buffer(xp, shape, dtype):
    """An empty buffer for MPI to receive into: on the device when xp is CuPy and the MPI is
    CUDA-aware, else on the host (bring it to the device with xp.asarray)."""
    if xp is not np and cuda_aware_mpi():
        return xp.empty(shape, dtype=dtype)
    return np.empty(shape, dtype=dtype)


def _import_cupy() -> ModuleType | None:
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def gpu_count(cupy: ModuleType | None) -> int:
    """Visible CUDA devices, 0 when CuPy or the driver is missing."""
    if cupy is None:
        return 0
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:
        return 0


def select_backend(device: str, comm: MPI.Intracomm) -> Backend:
    """NumPy for `cpu`; CuPy on GPU `local_rank % gpu_count` for `gpu`; `auto` picks gpu if any.

    Collective on comm (the local rank comes from a node split).
    """
    if device not in DEVICES:
        raise MpitrainError(f"--device {device!r}: expected one of {', '.join(DEVICES)}")
    local_rank, _ = local_rank_and_size(comm)
    if device == "cpu":
        return CPU
    cupy = _import_cupy()
    count = gpu_count(cupy)
    if count == 0:
        if device == "auto":
            return CPU
        reason = ("CuPy is not installed (pip install 'mpitrain[gpu-cuda12]' or '[gpu-cuda13]', as nvidia-smi's "
                  "CUDA Version says)") if cupy is None else "no CUDA device is visible"
        raise MpitrainError(f"--device gpu: {reason}")
    gpu_id = local_rank % count
    cupy.cuda.Device(gpu_id).use()
    return Backend("gpu", cupy, gpu_id)


_pinned: dict[tuple[str, int], np.ndarray] = {}


@contextmanager
def staged_on_host(device_buffer):
    """Copy a CuPy buffer into a pinned host buffer (allocated once per dtype and size), yield it,
    then copy the host buffer back. The download synchronizes the stream, so MPI never sees a
    buffer the GPU is still writing."""
    import cupyx

    key = (device_buffer.dtype.str, device_buffer.size)
    host = _pinned.get(key)
    if host is None:
        host = cupyx.empty_pinned(device_buffer.shape, dtype=device_buffer.dtype)
        _pinned[key] = host
    HOST.reads += 1
    device_buffer.get(out=host)
    yield host
    device_buffer.set(host)


# ---------------------------------------------------------------------------- BLAS threads


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def blas_threads_per_rank(ranks_on_node: int, requested: int | None = None) -> int:
    """Threads for each rank's BLAS so that ranks on the node x threads <= cores.

    `requested` (the --threads flag) wins, then MPITRAIN_THREADS; oversubscribing BLAS threads
    on a shared node made NumPy steps several times slower than one thread per rank.
    """
    if requested is None and os.environ.get("MPITRAIN_THREADS"):
        try:
            requested = int(os.environ["MPITRAIN_THREADS"])
        except ValueError:
            raise MpitrainError(f"MPITRAIN_THREADS={os.environ['MPITRAIN_THREADS']!r}: expected an integer") from None
    if requested is not None:
        if requested < 1:
            raise MpitrainError(f"--threads {requested}: expected a positive integer")
        return requested
    return max(1, available_cores() // max(1, ranks_on_node))


def limit_blas_threads(comm: MPI.Intracomm, requested: int | None = None) -> int:
    """Limit this rank's BLAS thread pools (threadpoolctl); returns the count. Collective on comm."""
    from threadpoolctl import threadpool_limits

    _, ranks_on_node = local_rank_and_size(comm)
    threads = blas_threads_per_rank(ranks_on_node, requested)
    threadpool_limits(limits=threads, user_api="blas")
    return threads


def runnable_threads() -> int | None:
    """Threads of this process, other than the caller, that are running or waiting for a core
    (state R in /proc/self/task/*/stat); None where /proc cannot tell (not Linux)."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    me, count = threading.get_native_id(), 0
    for tid in tids:
        if int(tid) == me:
            continue
        try:
            with open(f"/proc/self/task/{tid}/stat") as handle:
                stat = handle.read()
        except OSError:  # the thread ended
            continue
        count += stat[stat.rindex(")") + 2:].startswith("R")  # after "pid (name) ": the state
    return count


def settle_threads(timeout: float = 1.0, window: float = 0.005) -> float:
    """Sleep until no other thread of this process is runnable, at most `timeout` seconds; returns
    the seconds waited. Call after work with more BLAS threads than what follows uses, before
    timing the next thing on a node whose cores are all taken.

    OpenBLAS's idle worker threads spin (yielding, so always runnable) for a while after a
    multi-threaded call before they sleep (its THREAD_TIMEOUT, 2^28 cycles: about 0.1 s), each
    taking a core when it gets one, and lowering the thread count does not stop them. Measured on
    the 2-core machine: for 0.1-0.15 s after 2-thread products the process used a whole core while
    its main thread slept, and a one-thread step of 784-1024-10 run then on each of 2 ranks took
    9.5-17 ms of forward and backward against 5 ms after it. Settled when two looks `window`
    apart find none runnable. The thread states are read rather than the CPU time the process
    uses, which on a loaded node stays low while a spinning thread waits for a core; where /proc
    cannot tell, the CPU time over one window must be under a quarter of it. A thread that is
    always busy (MPICH's progress thread with MPIR_CVAR_ASYNC_PROGRESS=1) makes it wait `timeout`."""
    started = time.perf_counter()
    quiet = 0
    while time.perf_counter() - started < timeout:
        cpu, wall = time.process_time(), time.perf_counter()
        time.sleep(window)
        busy = runnable_threads()
        if busy is None:
            busy = time.process_time() - cpu >= 0.25 * (time.perf_counter() - wall)
        quiet = 0 if busy else quiet + 1
        if quiet == 2:
            break
    return time.perf_counter() - started


def step_finite(loss, grads) -> bool:
    """No NaN or Inf in a step's loss (a float or a 0-d NumPy/CuPy value) nor in `grads` (NumPy
    or CuPy, any shape). One counted device-to-host read in the common case.

    The common case costs one BLAS dot product, a single read of the gradient with no temporary
    (a NaN or an Inf makes loss + sum of squares non-finite), about half the time of
    isfinite().all(), which also writes a byte per element. A non-finite result may also be an
    overflow of finite values (|g| above ~1e19 in float32), so only the exact test says no."""
    xp = np if isinstance(grads, np.ndarray) else sys.modules["cupy"]
    flat = grads.reshape(-1)
    if flat.dtype in (np.float32, np.float64):
        with np.errstate(over="ignore", invalid="ignore"):
            if read_scalar(xp.isfinite(loss + xp.dot(flat, flat))):
                return True
    return math.isfinite(read_scalar(loss)) and bool(read_scalar(xp.isfinite(flat).all()))
