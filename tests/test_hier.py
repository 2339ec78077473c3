"""The hierarchical all-reduce on emulated nodes (MPITRAIN_RANKS_PER_NODE), in blocks, and its
shared window freed with the communicator."""

import numpy as np
import pytest
from mpi4py import MPI

from mpitrain.comm import allreduce, hier, traffic
from mpitrain.comm.ring import chunk_bounds


@pytest.mark.parametrize("per_node", ["1", "2", "3"])
def test_emulated_nodes_equal_mpi_allreduce(comm, monkeypatch, per_node):
    """Nodes of `per_node` consecutive ranks, the last one possibly smaller (4 ranks, 3 per node)."""
    monkeypatch.setenv("MPITRAIN_RANKS_PER_NODE", per_node)
    fresh = comm.Dup()  # the node split is cached per communicator: make it under this setting
    results = []
    for length in (0, 1, 5, 1001, 100003):
        buf = np.random.default_rng(comm.rank + length).standard_normal(length)
        expected = buf.copy()
        comm.Allreduce(MPI.IN_PLACE, expected, op=MPI.SUM)
        allreduce(buf, fresh, "hier")
        results.append((buf, expected))
    nodes = hier.node_group(fresh).nodes
    fresh.Free()
    assert nodes == -(-comm.size // int(per_node))
    for buf, expected in results:
        np.testing.assert_allclose(buf, expected, rtol=1e-12, atol=1e-12)


def test_long_buffers_go_through_in_blocks(comm, monkeypatch):
    monkeypatch.setattr(hier, "SLOT_BYTES", 256)
    monkeypatch.setenv("MPITRAIN_RANKS_PER_NODE", "2")
    fresh = comm.Dup()
    buf = np.random.default_rng(comm.rank).standard_normal(1001).astype(np.float32)
    expected = buf.copy()
    comm.Allreduce(MPI.IN_PLACE, expected, op=MPI.SUM)
    allreduce(buf, fresh, "hier")
    fresh.Free()
    np.testing.assert_allclose(buf, expected, rtol=1e-5, atol=1e-5)


def test_window_is_freed_with_the_communicator(comm):
    fresh = comm.Dup()
    allreduce(np.ones(100), fresh, "hier")
    group = hier.node_group(fresh)
    shared = group.window is not None or group.node.size == 1
    fresh.Free()
    assert shared and group.window is None


def test_dtypes_and_growing_sizes_share_one_window(comm):
    """The window grows with the buffers and is viewed per dtype; blocks alternate slot sets."""
    results = []
    for length, dtype in [(3, np.float64), (1000, np.float32), (5, np.int32), (70001, np.float64), (2, np.float32)]:
        buf = (np.arange(length) % 97 + comm.rank).astype(dtype)
        expected = buf.copy()
        comm.Allreduce(MPI.IN_PLACE, expected, op=MPI.SUM)
        allreduce(buf, comm, "hier")
        results.append((buf, expected))
    for buf, expected in results:
        np.testing.assert_array_equal(buf, expected)


def ring_sends(length: int, size: int, rank: int, itemsize: int) -> int:
    """Bytes rank sends in a ring all-reduce of `length` elements (comm/ring.py's order: reduce-scatter
    step k sends chunk rank-k-1, all-gather step k sends chunk rank-k)."""
    if size == 1 or length == 0:
        return 0
    bounds = chunk_bounds(length, size)

    def count(q):
        return bounds[q % size][1] - bounds[q % size][0]

    return itemsize * sum(count(rank - k - 1) + count(rank - k) for k in range(size - 1))


@pytest.mark.parametrize("two_level", [True, False], ids=["from-TWO_LEVEL_BYTES", "below"])
def test_equal_nodes_cross_with_every_local_rank(comm, monkeypatch, two_level):
    """Nodes of two ranks each: for buffers of at least TWO_LEVEL_BYTES every local rank rings its
    chunk of each block across the nodes (so each sends a ring's bytes for its chunk alone, about
    1/L of a leader's), below it the leaders alone ring each block; either way every rank ends with
    the same bits, equal to MPI Allreduce's result within rounding."""
    if comm.size < 4 or comm.size % 2:
        pytest.skip("needs at least two emulated nodes of two ranks")
    monkeypatch.setenv("MPITRAIN_RANKS_PER_NODE", "2")
    monkeypatch.setattr(hier, "SLOT_BYTES", 4096)
    buf = np.random.default_rng(comm.rank).standard_normal(1501)
    monkeypatch.setattr(hier, "TWO_LEVEL_BYTES", buf.nbytes if two_level else buf.nbytes + 1)
    fresh = comm.Dup()
    expected = buf.copy()
    comm.Allreduce(MPI.IN_PLACE, expected, op=MPI.SUM)
    before = traffic.sent()
    allreduce(buf, fresh, "hier")
    sent = traffic.sent() - before
    group = hier.node_group(fresh)
    local, nodes = group.node.size, group.nodes
    fresh.Free()
    assert local == 2 and nodes == comm.size // 2 and group.node_sizes == [2] * nodes
    per_block = hier.block_bytes(buf.nbytes) // buf.itemsize
    expected_sent = 0
    for start in range(0, buf.size, per_block):
        block = min(per_block, buf.size - start)
        if two_level:
            a, b = chunk_bounds(block, local)[comm.rank % local]
            expected_sent += ring_sends(b - a, nodes, comm.rank // local, buf.itemsize)
        elif comm.rank % local == 0:
            expected_sent += ring_sends(block, nodes, comm.rank // local, buf.itemsize)
    assert sent == expected_sent
    np.testing.assert_allclose(buf, expected, rtol=1e-12, atol=1e-12)
    assert comm.allgather(buf.tobytes()) == [buf.tobytes()] * comm.size


def _chunks(length: int, size: int, kind: str):
    """[start, stop) per rank: equal blocks, or unequal ones with an empty chunk in the middle."""
    if kind == "equal" or size == 1:
        return chunk_bounds(length, size)
    cuts = [0] + [min(length, (length * q * q) // (size * size)) for q in range(1, size)] + [length]
    cuts[size // 2] = cuts[size // 2 - 1] if size > 1 else cuts[0]  # rank size//2 - 1 owns nothing
    return [(cuts[q], cuts[q + 1]) for q in range(size)]


@pytest.mark.parametrize("per_node", [None, "2"])
@pytest.mark.parametrize("kind", ["equal", "unequal"])
def test_hier_reduce_scatter_then_allgather_equals_the_hier_allreduce_bit_for_bit(comm, monkeypatch, per_node,
                                                                                  kind):
    """--zero's halves on the hierarchical algorithm (shared memory on one node, the all-reduce and
    the ring all-gather across emulated nodes), in blocks of small slots so several slot sets
    alternate: each rank's chunk after the reduce-scatter, and every entry after the all-gather,
    equal the hierarchical all-reduce's bits; no message is counted within one node."""
    from mpitrain.comm.allreduce import shard_gather_schedule, shard_reduce_schedule
    from mpitrain.comm.ring import complete

    monkeypatch.setattr(hier, "SLOT_BYTES", 512)
    if per_node:
        monkeypatch.setenv("MPITRAIN_RANKS_PER_NODE", per_node)
    fresh = comm.Dup()
    failures = []
    for length in (1, 7, 1001):
        chunks = _chunks(length, comm.size, kind)
        data = np.random.default_rng(comm.rank + length).standard_normal(length).astype(np.float32)
        expected = data.copy()
        allreduce(expected, fresh, "hier")
        buf = data.copy()
        complete(shard_reduce_schedule(buf, fresh, "hier", chunks))
        start, stop = chunks[comm.rank]
        if not np.array_equal(buf[start:stop], expected[start:stop]):
            failures.append(("reduce-scatter", length))
        gathered = np.full(length, np.nan, dtype=np.float32)
        gathered[start:stop] = buf[start:stop]
        complete(shard_gather_schedule(gathered, fresh, "hier", chunks))
        if not np.array_equal(gathered, expected):
            failures.append(("all-gather", length))
    nodes = hier.node_group(fresh).nodes
    fresh.Free()
    assert nodes == (1 if per_node is None else -(-comm.size // 2))
    assert not failures, failures


def test_one_node_hier_halves_send_no_message(comm):
    """On one node the hierarchical reduce-scatter and all-gather go through shared memory: the
    traffic counter (what the metrics report as bytes sent) does not move."""
    from mpitrain.comm.allreduce import shard_gather_schedule, shard_reduce_schedule
    from mpitrain.comm.ring import complete

    fresh = comm.Dup()
    if hier.node_group(fresh).nodes > 1 or comm.size == 1:
        fresh.Free()
        pytest.skip("needs several ranks on one node")
    buf = np.ones(1000, dtype=np.float32)
    chunks = chunk_bounds(buf.size, comm.size)
    before = traffic.sent()
    complete(shard_reduce_schedule(buf, fresh, "hier", chunks))
    complete(shard_gather_schedule(buf, fresh, "hier", chunks))
    after = traffic.sent()
    fresh.Free()
    assert after == before
    assert np.all(buf == comm.size)
