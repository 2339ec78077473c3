"""The array backend (mpitrain/backend.py): host reads a training step makes, CUDA-aware MPI detection."""

import dataclasses

import numpy as np
import pytest

from mpitrain import backend
from mpitrain.config import TrainConfig, validate
from mpitrain.errors import MpitrainError
from mpitrain.train import train


def reads_and_syncs(settings: TrainConfig, comm) -> tuple[int, int]:
    before = dataclasses.replace(backend.HOST)
    train(settings, comm)
    return backend.HOST.reads - before.reads, backend.HOST.syncs - before.syncs


@pytest.mark.parametrize("on_nan", ["abort", "skip"])
def test_a_data_parallel_step_reads_the_device_once(comm, small_classification, on_nan):
    """Per step: one device-to-host read (the NaN/Inf agreement's loss + gradient check) and no
    synchronization; the step losses stay on the device until the epoch's record. Measured as
    the difference of two runs of one epoch that differ only in their step count."""
    settings = validate(TrainConfig(model="12-8-3", data=small_classification, batch_size=16, device="cpu",
                                    progress=False, sampler="global", on_nan=on_nan, epochs=1))
    short, long = 3, 9
    reads_short, syncs_short = reads_and_syncs(dataclasses.replace(settings, steps=short), comm)
    reads_long, syncs_long = reads_and_syncs(dataclasses.replace(settings, steps=long), comm)
    assert (reads_long - reads_short) == long - short
    assert syncs_long == syncs_short


def test_cuda_aware_mpi_is_forced_by_the_environment_or_asked_of_the_library(monkeypatch):
    """MPITRAIN_CUDA_AWARE=0|1 decides; otherwise the loaded libmpi's MPIX_Query_cuda_support
    (called here directly, through ctypes, as the oracle); a bad value is one clear error."""
    for value, expected in (("1", True), ("0", False)):
        monkeypatch.setenv("MPITRAIN_CUDA_AWARE", value)
        backend.cuda_aware_mpi.cache_clear()
        assert backend.cuda_aware_mpi() is expected
    monkeypatch.setenv("MPITRAIN_CUDA_AWARE", "yes")
    backend.cuda_aware_mpi.cache_clear()
    with pytest.raises(MpitrainError, match="MPITRAIN_CUDA_AWARE='yes': expected 0 or 1"):
        backend.cuda_aware_mpi()
    monkeypatch.delenv("MPITRAIN_CUDA_AWARE")
    backend.cuda_aware_mpi.cache_clear()
    query = backend._mpi_symbol("MPIX_Query_cuda_support")
    assert backend.cuda_aware_mpi() is (bool(query()) if query is not None else False)
    backend.cuda_aware_mpi.cache_clear()


def test_host_buffers_go_to_mpi_as_they_are(monkeypatch):
    """NumPy arrays are never copied for MPI, CUDA-aware or not; receives land on the host."""
    array = np.arange(6.0)
    for value in ("0", "1"):
        monkeypatch.setenv("MPITRAIN_CUDA_AWARE", value)
        backend.cuda_aware_mpi.cache_clear()
        assert backend.for_mpi(array) is array
        assert isinstance(backend.receive_buffer(np, (2, 3), np.float32), np.ndarray)
    backend.cuda_aware_mpi.cache_clear()


def test_settle_threads_waits_out_the_blas_workers_spinning_after_a_multithreaded_call(comm):
    """After 2-thread products OpenBLAS's idle worker stays runnable (spinning) for about 0.1 s;
    settle_threads returns only once no other thread of the process is runnable, and then the
    process uses (almost) no CPU while its main thread sleeps, which is what a one-thread
    measurement started then needs. Right after the products a thread is runnable (checked first,
    so the test shows the effect it removes). As in a calibration, rank 0 does it while the other
    ranks sleep; the thread states hold whatever else loads the machine."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from mpitrain.plan.calibrate import polite_barrier

    if backend.available_cores() < 2 or not any(lib["internal_api"] == "openblas" for lib in threadpool_info()):
        pytest.skip("needs 2 cores and NumPy's OpenBLAS")
    if backend.runnable_threads() is None:
        pytest.skip("needs /proc/self/task (Linux)")
    import time

    polite_barrier(comm)
    if comm.rank != 0:
        polite_barrier(comm)
        return
    a = np.ones((512, 512), dtype=np.float32)
    try:
        with threadpool_limits(limits=2, user_api="blas"):
            for _ in range(20):
                a @ a
        spinning = backend.runnable_threads()
        waited = backend.settle_threads()
        after = backend.runnable_threads()
        cpu, wall = time.process_time(), time.perf_counter()
        time.sleep(0.05)
        share = (time.process_time() - cpu) / (time.perf_counter() - wall)
    finally:
        polite_barrier(comm)
    assert spinning >= 1
    assert 0.0 < waited < 1.0 and after == 0
    assert share < 0.25, share


def test_settle_threads_returns_at_once_when_nothing_spins():
    assert backend.settle_threads() < 0.2
