"""The array backend: NumPy on the CPU or CuPy on this rank's GPU, chosen once per run.

Compute code receives `backend.xp` and uses only the API NumPy and CuPy share, so one code path
serves both. CuPy is imported only when a GPU is asked for or `auto` looks for one.
Each rank binds GPU `local_rank % gpu_count`, the local rank coming from an MPI shared-memory
split; several ranks may share one GPU.
"""

import os
from contextlib import contextmanager
from dataclasses import dataclass
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
        """Wait for queued GPU work; a no-op on the CPU."""
        if self.device == "gpu":
            self.xp.cuda.get_current_stream().synchronize()

    def describe(self) -> str:
        return "cpu (numpy)" if self.device == "cpu" else f"gpu {self.gpu_id} (cupy)"


CPU = Backend("cpu", np)


def to_host(array) -> np.ndarray:
    """A NumPy view or copy of a NumPy or CuPy array (synchronizes a device array)."""
    return array if isinstance(array, np.ndarray) else array.get()


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
        reason = "CuPy is not installed (pip install 'mpitrain[gpu]')" if cupy is None else "no CUDA device is visible"
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
