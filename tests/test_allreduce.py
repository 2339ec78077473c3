"""Every all-reduce algorithm equals MPI Allreduce, in place, on every world size up to the job's;
reduce_scatter then allgather is an all-reduce. NumPy always, CuPy where a GPU is present."""

import numpy as np
import pytest
from mpi4py import MPI

from mpitrain.comm import ALGORITHMS, allgather, allreduce, chunk_bounds, reduce_scatter
from mpitrain.errors import MpitrainError


def _cupy_or_none():
    try:
        import cupy

        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:  # no CuPy, or no driver: either way there is no device to test on
        return None


BACKENDS = [pytest.param("numpy", id="numpy"),
            pytest.param("cupy", id="cupy", marks=pytest.mark.skipif(_cupy_or_none() is None, reason="no CuPy GPU"))]


def to_backend(array: np.ndarray, backend: str):
    return array if backend == "numpy" else _cupy_or_none().asarray(array)


def to_host(array) -> np.ndarray:
    return array if isinstance(array, np.ndarray) else array.get()


def lengths(size: int) -> list[int]:
    """Empty, one element, fewer elements than ranks, odd, and large (several ring segments)."""
    return sorted({0, 1, max(size - 1, 1), size, 7, 1001, 1000003})


def tolerance(dtype) -> float:
    return 1e-5 if dtype == np.float32 else 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_equals_mpi_allreduce(comm, backend, dtype, algorithm):
    mismatches = []
    for length in lengths(comm.size):
        host = np.random.default_rng(1000 * comm.rank + length).standard_normal(length).astype(dtype)
        expected = host.copy()
        comm.Allreduce(MPI.IN_PLACE, expected, op=MPI.SUM)
        buf = to_backend(host, backend)
        before = buf.data.ptr if backend == "cupy" else buf.__array_interface__["data"][0]
        allreduce(buf, comm, algorithm)
        after = buf.data.ptr if backend == "cupy" else buf.__array_interface__["data"][0]
        result = to_host(buf)
        if before != after:
            mismatches.append(f"length {length}: not in place")
        if not np.allclose(result, expected, rtol=tolerance(dtype), atol=tolerance(dtype)):
            mismatches.append(f"length {length}: max error {np.max(np.abs(result - expected))}")
    assert not mismatches, mismatches


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_world_size_up_to_the_jobs(comm, algorithm):
    """Sub-communicators of 1..p ranks cover worlds that are not powers of two (3 of 4 ranks)."""
    mismatches = []
    for size in range(1, comm.size + 1):
        sub = comm.Split(0 if comm.rank < size else 1, comm.rank)
        buf = np.random.default_rng(comm.rank).standard_normal(1001)
        everyone = comm.allgather(buf.copy())
        members = range(size) if comm.rank < size else range(size, comm.size)
        expected = np.sum([everyone[rank] for rank in members], axis=0)
        allreduce(buf, sub, algorithm)
        sub.Free()
        if not np.allclose(buf, expected, rtol=1e-12, atol=1e-12):
            mismatches.append(f"world of {size}: max error {np.max(np.abs(buf - expected))}")
    assert not mismatches, mismatches


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_rank_ends_with_identical_bits(comm, algorithm):
    buf = np.random.default_rng(comm.rank).standard_normal(4099).astype(np.float32)
    allreduce(buf, comm, algorithm)
    gathered = comm.allgather(buf)
    for other in gathered:
        np.testing.assert_array_equal(other, gathered[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [0, 1, 3, 1001])
def test_reduce_scatter_then_allgather_is_allreduce(comm, backend, length):
    host = np.random.default_rng(comm.rank).standard_normal(length)
    expected = host.copy()
    comm.Allreduce(MPI.IN_PLACE, expected, op=MPI.SUM)
    buf = to_backend(host, backend)
    start, stop = reduce_scatter(buf, comm)
    owned = to_host(buf)[start:stop].copy()
    allgather(buf, comm)
    assert (start, stop) == chunk_bounds(length, comm.size)[comm.rank], "rank r owns chunk r"
    np.testing.assert_allclose(owned, expected[start:stop], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_host(buf), expected, rtol=1e-12, atol=1e-12)


def test_allgather_copies_each_ranks_chunk(comm):
    length = 10
    buf = np.full(length, -1.0)
    start, stop = chunk_bounds(length, comm.size)[comm.rank]
    buf[start:stop] = comm.rank
    allgather(buf, comm)
    expected = np.concatenate([np.full(b - a, rank, dtype=float) for rank, (a, b) in
                               enumerate(chunk_bounds(length, comm.size))])
    np.testing.assert_array_equal(buf, expected)


def test_integer_sums_are_exact(comm):
    results = {}
    for algorithm in ALGORITHMS:
        buf = np.arange(17, dtype=np.int64) * (comm.rank + 1)
        allreduce(buf, comm, algorithm)
        results[algorithm] = buf
    for algorithm, buf in results.items():
        np.testing.assert_array_equal(buf, np.arange(17) * sum(range(1, comm.size + 1)), err_msg=algorithm)


def test_rejects_bad_calls_before_communicating(comm):
    with pytest.raises(MpitrainError, match="allreduce algorithm 'tree'"):
        allreduce(np.zeros(3), comm, "tree")
    with pytest.raises(MpitrainError, match="1-D contiguous"):
        allreduce(np.zeros((2, 3)), comm, "ring")
    with pytest.raises(MpitrainError, match="1-D contiguous"):
        reduce_scatter(np.zeros(6)[::2], comm)
