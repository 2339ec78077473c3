"""The pipelined ring: segments cover the buffer, many small segments still sum correctly, and
the scratch is reused, so a call allocates nothing after the first one of its size."""

import tracemalloc

import numpy as np
import pytest
from mpi4py import MPI

from mpitrain.comm import ring
from mpitrain.comm.ring import chunk_bounds, ring_allreduce, segments


@pytest.mark.parametrize("length,size", [(0, 3), (2, 4), (10, 3), (1000003, 4)])
def test_chunk_bounds_cover_the_buffer(length, size):
    bounds = chunk_bounds(length, size)
    assert bounds[0][0] == 0 and bounds[-1][1] == length
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("length,size,segment_bytes", [(0, 2, 64), (5, 4, 8), (1001, 3, 64), (1 << 20, 4, 1 << 20)])
def test_segments_tile_each_chunk_in_equal_numbers(length, size, segment_bytes):
    tiles = segments(tuple(chunk_bounds(length, size)), 4, segment_bytes)
    assert len({len(chunk) for chunk in tiles}) == 1
    for (start, stop), chunk in zip(chunk_bounds(length, size), tiles):
        assert chunk[0][0] == start and chunk[-1][1] == stop
        assert all(a[1] == b[0] for a, b in zip(chunk, chunk[1:]))
        assert all((b - a) * 4 <= segment_bytes or len(chunk) == 1 for a, b in chunk)


@pytest.mark.parametrize("segment_bytes,window", [(64, 1), (64, 2), (200, 3)])
def test_many_segments_in_flight_sum_correctly(comm, monkeypatch, segment_bytes, window):
    """Tiny segments make every step a long pipeline, with steps interleaving in the window."""
    monkeypatch.setattr(ring, "SEGMENT_BYTES", segment_bytes)
    monkeypatch.setattr(ring, "WINDOW", window)
    results = []
    for length in (1, 7, 1001):
        buf = np.random.default_rng(comm.rank + length).standard_normal(length).astype(np.float32)
        expected = buf.copy()
        comm.Allreduce(MPI.IN_PLACE, expected, op=MPI.SUM)
        ring_allreduce(buf, comm)
        results.append((buf, expected))
    for buf, expected in results:
        np.testing.assert_allclose(buf, expected, rtol=1e-5, atol=1e-5)


def test_scratch_is_reused_and_calls_allocate_nothing(comm):
    buf = np.random.default_rng(comm.rank).standard_normal(300001).astype(np.float32)
    ring_allreduce(buf, comm)
    scratch = ring.scratch_buffer(np.dtype(np.float32), 1)
    tracemalloc.start()
    start, _ = tracemalloc.get_traced_memory()
    for _ in range(3):
        ring_allreduce(buf, comm)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert ring.scratch_buffer(np.dtype(np.float32), 1) is scratch
    assert peak - start < 64 << 10, f"{peak - start} bytes allocated by 3 calls on a {buf.nbytes}-byte buffer"


def test_allgather_with_uneven_chunks_equals_mpi_allgatherv(comm):
    # Chunk r has r+1 elements for odd r and none for even r: unequal and empty chunks both occur
    # (a tensor group's column slices of a width it does not divide).
    counts = [(r + 1) * (r % 2) for r in range(comm.size)]
    stops = np.cumsum(counts).tolist()
    chunks = list(zip([0] + stops[:-1], stops))
    buf = np.full(sum(counts), -1.0)
    start, stop = chunks[comm.rank]
    buf[start:stop] = comm.rank + np.arange(stop - start) / 10
    expected = np.empty_like(buf)
    comm.Allgatherv(buf[start:stop].copy(), [expected, counts])
    ring.complete(ring.allgather_schedule(buf, comm, chunks=chunks))
    np.testing.assert_array_equal(buf, expected)


@pytest.mark.parametrize("length", [1, 7, 10007])
def test_ring_counts_exactly_the_bytes_it_sends(comm, length):
    """Each phase passes on every chunk but one: all but chunk `rank`, then all but chunk `rank+1`."""
    from mpitrain.comm import traffic

    buf = np.random.default_rng([comm.rank, length]).standard_normal(length)
    expected = buf.copy()
    comm.Allreduce(MPI.IN_PLACE, expected, op=MPI.SUM)
    before = traffic.sent()
    ring_allreduce(buf, comm)
    sent = traffic.sent() - before
    np.testing.assert_allclose(buf, expected, rtol=1e-12, atol=1e-12)
    sizes = [stop - start for start, stop in chunk_bounds(length, comm.size)]
    unsent = sizes[comm.rank] + sizes[(comm.rank + 1) % comm.size]
    assert sent == (0 if comm.size == 1 else (2 * length - unsent) * buf.itemsize)
