"""The tensor group's ring reduce-scatter and all-gather equal MPI's collectives, for any length."""

import numpy as np
import pytest
from mpi4py import MPI

from mpitrain.comm.ring import chunk_bounds
from mpitrain.parallel import p2p


def lengths(size: int) -> list[int]:
    return sorted({0, 1, max(size - 1, 1), size, 2 * size + 1, 10007})


def contribution(comm, length, dtype):
    return np.random.default_rng([comm.rank, length]).standard_normal(length).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reduce_scatter_leaves_each_rank_its_summed_chunk(comm, dtype):
    for length in lengths(comm.size):
        buf = contribution(comm, length, dtype)
        expected = buf.copy()
        comm.Allreduce(MPI.IN_PLACE, expected, op=MPI.SUM)
        p2p.reduce_scatter(buf, comm)
        start, stop = chunk_bounds(length, comm.size)[comm.rank]
        tolerance = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(buf[start:stop], expected[start:stop], rtol=tolerance, atol=tolerance)


def test_allgather_with_uneven_bounds_equals_mpi_allgatherv(comm):
    # Chunk r has r+1 elements for odd r and none for even r: unequal and empty chunks both occur.
    counts = [(r + 1) * (r % 2) for r in range(comm.size)]
    stops = np.cumsum(counts).tolist()
    bounds = list(zip([0] + stops[:-1], stops))
    buf = np.full(sum(counts), -1.0)
    start, stop = bounds[comm.rank]
    buf[start:stop] = comm.rank + np.arange(stop - start) / 10
    mine = buf[start:stop].copy()
    expected = np.empty_like(buf)
    comm.Allgatherv(mine, [expected, counts])
    p2p.allgather(buf, comm, bounds)
    np.testing.assert_array_equal(buf, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reduce_scatter_then_allgather_is_allreduce(comm, dtype):
    for length in lengths(comm.size):
        buf = contribution(comm, length, dtype)
        expected = buf.copy()
        comm.Allreduce(MPI.IN_PLACE, expected, op=MPI.SUM)
        sent = p2p.allreduce(buf, comm)
        tolerance = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(buf, expected, rtol=tolerance, atol=tolerance, err_msg=f"length {length}")
        # Each phase passes on every chunk but one: all but chunk `rank`, then all but chunk `rank+1`.
        sizes = [stop - start for start, stop in chunk_bounds(length, comm.size)]
        unsent = sizes[comm.rank] + sizes[(comm.rank + 1) % comm.size]
        assert sent == (0 if comm.size == 1 else (2 * length - unsent) * buf.itemsize)


def test_every_rank_ends_with_identical_bits(comm):
    buf = contribution(comm, 4099, np.float64)
    p2p.allreduce(buf, comm)
    gathered = comm.allgather(buf)
    for other in gathered:
        np.testing.assert_array_equal(other, gathered[0])
