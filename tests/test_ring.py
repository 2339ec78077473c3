"""The hand-written ring all-reduce equals MPI Allreduce, in place, for any length and dtype."""

import numpy as np
import pytest
from mpi4py import MPI

from mpitrain.comm import allreduce
from mpitrain.comm.ring import chunk_bounds


def lengths(size: int) -> list[int]:
    return sorted({0, 1, max(size - 1, 1), size, 1000003})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("algorithm", ["ring", "mpi"])
def test_equals_mpi_allreduce(comm, dtype, algorithm):
    for length in lengths(comm.size):
        rng = np.random.default_rng(1000 * comm.rank + length)
        buf = rng.standard_normal(length).astype(dtype)
        expected = buf.copy()
        comm.Allreduce(MPI.IN_PLACE, expected, op=MPI.SUM)
        address = buf.__array_interface__["data"][0]
        allreduce(buf, comm, algorithm)
        assert buf.__array_interface__["data"][0] == address, "all-reduce must work in place"
        tolerance = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(buf, expected, rtol=tolerance, atol=tolerance, err_msg=f"length {length}")


def test_every_rank_ends_with_identical_bits(comm):
    buf = np.random.default_rng(comm.rank).standard_normal(4099)
    allreduce(buf, comm, "ring")
    gathered = comm.allgather(buf)
    for other in gathered:
        np.testing.assert_array_equal(other, gathered[0])


def test_integer_sum_is_exact(comm):
    buf = np.arange(17, dtype=np.int64) * (comm.rank + 1)
    allreduce(buf, comm, "ring")
    np.testing.assert_array_equal(buf, np.arange(17) * sum(range(1, comm.size + 1)))


@pytest.mark.parametrize("length,size", [(0, 3), (2, 4), (10, 3), (1000003, 4)])
def test_chunk_bounds_cover_the_buffer(length, size):
    bounds = chunk_bounds(length, size)
    assert bounds[0][0] == 0 and bounds[-1][1] == length
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_rejects_unknown_algorithm(comm):
    from mpitrain.errors import MpitrainError

    with pytest.raises(MpitrainError, match="allreduce algorithm 'tree'"):
        allreduce(np.zeros(3), comm, "tree")
