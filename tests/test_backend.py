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
