"""Hierarchical all-reduce: sum within each node through shared memory, ring across one leader
per node, and hand the total back within the node through the same memory.

The ranks of a node (an MPI shared-memory split, or MPITRAIN_RANKS_PER_NODE consecutive ranks)
share one MPI window. Each rank copies its buffer into its slot; after a barrier every rank sums
all the slots, in local-rank order, straight into its own buffer, so every rank of the node
holds the same bits of the node's sum. On one node that is the whole all-reduce: one copy, one
barrier, one pass over the slots, no MPI message, which beats MPI Allreduce from about 32 KiB
to 512 KiB at 2 ranks here (beyond, every rank adding the whole buffer costs more than MPI's
exchange; its halves below, where each adds only its own part, lead to 1-4 MiB). With several
nodes the leaders then ring-all-reduce their buffers, publish the total in a shared slot, and
after a second barrier the other ranks copy it out.

When every node has the same number of ranks L > 1 and the buffer holds at least the layout's
two-level threshold, all of them work across nodes instead of the leaders alone (the two-level
scheme of NCCL's and Horovod's hierarchical all-reduce): local rank j sums chunk j of the node's
slots (a reduce-scatter in shared memory, so each rank adds 1/L of the block instead of all of
it), ring-all-reduces that chunk with the local ranks j of the other nodes, and writes the total
into the shared slot, from which every rank copies the whole block (an all-gather in shared
memory). Each rank sends 2(N-1)/N of a chunk across nodes, 1/L of what a leader sends, and L
rings share the inter-node links. Below the threshold the leaders alone cross. Where it lies
depends on the network, so `mpitrain tune` measures it per layout (comm/tune.py); without a
tuned value it is TWO_LEVEL_BYTES, 1 MiB, measured on two emulated hosts of two ranks: on a
1 Gbit/s link L concurrent streams of 1/L of a small block each lost to one stream of the whole
block (256 KiB at 0.116 GB/s busbw against 0.179 for the leaders; from 1 MiB both 0.17-0.18);
unshaped the two-level scheme leads from 1 MiB (0.60 against 0.50 GB/s).

Slots come in two sets used by alternate blocks: a rank may copy the next block in while a
slower rank still reads the previous one, so no barrier is needed at the end. Buffers longer
than SLOT_BYTES go through in slot-sized blocks, so the window stays small. The state (node and
leader communicators, the window) is cached on the communicator as an MPI attribute and freed
with it.
"""

import atexit
import sys

import numpy as np
from mpi4py import MPI

from mpitrain.comm.ring import allgather_schedule, chunk_bounds, ring_schedule
from mpitrain.comm.tunefile import tuned_entry
from mpitrain.comm.world import node_comm
from mpitrain.errors import MpitrainError

SLOT_BYTES = 4 << 20
TWO_LEVEL_BYTES = 1 << 20  # buffers from this size use every local rank across nodes (see above)
_TAG = 140


def equal_nodes(node_sizes: list[int]) -> bool:
    """Several nodes, each with the same number L > 1 of ranks: where the two-level scheme applies."""
    return len(node_sizes) > 1 and node_sizes[0] > 1 and len(set(node_sizes)) == 1


def two_level(nbytes: int, node_sizes: list[int], threshold: int | None = TWO_LEVEL_BYTES) -> bool:
    """Whether a buffer of nbytes crosses nodes from every local rank (the two-level scheme) rather
    than from the leaders alone: equal nodes and a buffer of at least `threshold` bytes (None:
    never; `mpitrain tune` measures it per layout)."""
    return equal_nodes(node_sizes) and threshold is not None and nbytes >= threshold


def tuned_two_level_bytes(world_size: int, nodes: int) -> int | None:
    """The threshold `mpitrain tune` measured for this layout, else TWO_LEVEL_BYTES. MpitrainError
    when the tuning file is unreadable."""
    entry = tuned_entry(world_size, nodes)
    return entry.get("hier_two_level_bytes", TWO_LEVEL_BYTES) if entry else TWO_LEVEL_BYTES


def block_bytes(nbytes: int) -> int:
    """Bytes per block (and per slot): the buffer rounded up to a power of two, at most SLOT_BYTES."""
    return min(SLOT_BYTES, 1 << max(6, (nbytes - 1).bit_length()))


class NodeGroup:
    """This rank's node communicator, the leaders' communicator and the shared slots of a comm."""

    def __init__(self, comm: MPI.Intracomm):
        self.node = node_comm(comm)
        self.leaders = comm.Split(0 if self.node.rank == 0 else MPI.UNDEFINED, comm.rank)
        # Ranks on each node, in leader order (the same list on every rank).
        self.node_sizes = self.node.bcast(self.leaders.allgather(self.node.size) if self.node.rank == 0 else None,
                                          root=0)
        self.nodes = len(self.node_sizes)
        self.window = None
        self.slot_bytes = 0
        self.raw = None
        self.views: dict[np.dtype, np.ndarray] = {}
        self.cross = None
        # From which size the ranks cross with every local rank: rank 0's tuning file, for all.
        self.two_level_bytes = TWO_LEVEL_BYTES
        if equal_nodes(self.node_sizes):
            found, error = None, None
            if comm.rank == 0:
                try:
                    found = tuned_two_level_bytes(comm.size, self.nodes)
                except MpitrainError as exc:
                    error = str(exc)
            found, error = comm.bcast((found, error), root=0)
            if error is not None:
                self.free()  # the same on every rank: nothing made here outlives the error
                raise MpitrainError(error)
            self.two_level_bytes = found
            # Local rank j of every node, when all nodes hold as many ranks: one ring per chunk.
            self.cross = comm.Split(self.node.rank, comm.rank)
        self.blocks = 0  # blocks reduced so far: its parity picks the set of slots

    def slots(self, dtype: np.dtype, block: int) -> np.ndarray:
        """(2 L + 1, block) view of the shared window: two sets of L slots and the nodes' total.
        Grown (collectively, on the node) to hold blocks of `block` bytes."""
        if block > self.slot_bytes:
            self._free_window()
            total = (2 * self.node.size + 1) * block
            self.window = MPI.Win.Allocate_shared(total if self.node.rank == 0 else 0, 1, comm=self.node)
            memory, _ = self.window.Shared_query(0)
            self.raw = np.frombuffer(memory, dtype=np.uint8, count=total)
            self.window.Lock_all()
            self.slot_bytes = block
            _open_windows.append(self)
        view = self.views.get(dtype)
        if view is None:
            view = self.raw.view(dtype).reshape(2 * self.node.size + 1, -1)
            self.views[dtype] = view
        return view

    def barrier(self):
        """Schedule: a node barrier with the window's memory made consistent on both sides."""
        self.window.Sync()
        yield [self.node.Ibarrier()]
        self.window.Sync()

    def _free_window(self) -> None:
        if self.window is not None:
            _open_windows.remove(self)
            self.views.clear()
            self.window.Unlock_all()
            self.window.Free()
            self.window = self.raw = None

    def free(self) -> None:
        self._free_window()
        if self.leaders != MPI.COMM_NULL:
            self.leaders.Free()
        if self.cross is not None:
            self.cross.Free()
        self.node.Free()


def _free_group(comm, keyval, group) -> None:
    group.free()


_KEYVAL = MPI.Comm.Create_keyval(delete_fn=_free_group)

# Windows still open at exit (those of communicators never freed, such as the library's world
# clone) are freed before mpi4py finalizes MPI, in the order they were made, which every rank of a
# node shares: with the OFI netmod, which real nodes use, a window left open makes MPI_Finalize
# fail ("fabricclose failed: Device or resource busy"). An atexit hook, because MPICH 5 does not
# call the delete callbacks of COMM_SELF's attributes in MPI_Finalize. Not after an uncaught
# exception (sys.last_value is set): the freeing is collective on the node, and a rank that failed
# alone would wait there for the others instead of exiting non-zero, which ends the job.
_open_windows: list[NodeGroup] = []


@atexit.register
def _free_open_windows() -> None:
    if MPI.Is_initialized() and not MPI.Is_finalized() and not hasattr(sys, "last_value"):
        for group in list(_open_windows):
            group._free_window()


def node_group(comm: MPI.Intracomm) -> NodeGroup:
    """The NodeGroup of comm, made on first use (collective) and freed with comm."""
    group = comm.Get_attr(_KEYVAL)
    if group is None:
        group = NodeGroup(comm)
        comm.Set_attr(_KEYVAL, group)
    return group


def reserve(comm: MPI.Intracomm, dtype, nbytes: int) -> None:
    """Make comm's node group and its slots for buffers of up to nbytes now. Collective on comm.

    Gradient buckets call this once, when they are planned: a schedule that grows the slots does
    so when it first runs, and a bucket's schedule first runs at a point that differs from rank to
    rank (it waits for the previous bucket), so the window's collective free and allocation could
    meet another rank's blocking check of the next bucket and deadlock."""
    if comm.size == 1:
        return
    group = node_group(comm)
    if group.node.size > 1:
        group.slots(np.dtype(dtype), block_bytes(nbytes))


def _sum_in_node(group: NodeGroup, block: np.ndarray, slots: np.ndarray, part: slice = slice(None)):
    """Schedule: block[part] <- sum of every local rank's block[part], added in local-rank order
    (the same bits on whichever rank adds them). Every rank copies its whole block into its slot."""
    local = group.node.size
    first = (group.blocks % 2) * local
    mine = slots[first:first + local, :block.size]
    group.blocks += 1
    mine[group.node.rank] = block
    yield from group.barrier()
    out = block[part]
    np.add(mine[0, part], mine[1, part], out=out)
    for other in range(2, local):
        np.add(out, mine[other, part], out=out)


def _share_total(group: NodeGroup, block: np.ndarray, slots: np.ndarray, part: slice | None):
    """Schedule: every rank of the node ends with the node's total: each rank writes the `part` of
    it that it holds (None: nothing) into the shared slot, and after a barrier the ranks that did
    not hold all of it copy the whole out."""
    total = slots[2 * group.node.size, :block.size]
    if part is not None:
        total[part] = block[part]
    yield from group.barrier()
    if part != slice(None):
        block[...] = total


def _two_level(group: NodeGroup, block: np.ndarray, slots: np.ndarray, tag: int):
    """Schedule: block <- sum over every rank of every node, all local ranks crossing nodes: chunk
    j summed in shared memory by local rank j (in local-rank order, the node sum's bits), ring
    across the nodes' local ranks j, published in the shared total, copied out by every rank."""
    start, stop = chunk_bounds(block.size, group.node.size)[group.node.rank]
    part = slice(start, stop)
    yield from _sum_in_node(group, block, slots, part)
    yield from ring_schedule(block[part], group.cross, tag)
    yield from _share_total(group, block, slots, part)


def hier_schedule(buf: np.ndarray, comm: MPI.Intracomm, tag: int = _TAG):
    """Schedule: buf <- sum over ranks, in place: node sum in shared memory, leader ring, copy out."""
    if comm.size == 1 or buf.size == 0:
        return
    group = node_group(comm)
    local, leader = group.node.size, group.node.rank == 0
    # Nodes may hold different numbers of ranks, so the block length depends on the buffer alone:
    # every leader must cut the same blocks for the leaders' ring to match.
    block_size = block_bytes(buf.nbytes)
    per_block = block_size // buf.itemsize
    slots = group.slots(buf.dtype, block_size) if local > 1 else None
    every_rank = two_level(buf.nbytes, group.node_sizes, group.two_level_bytes)
    for start in range(0, buf.size, per_block):
        block = buf[start:start + per_block]
        if every_rank:
            yield from _two_level(group, block, slots, tag)
            continue
        if local > 1:
            yield from _sum_in_node(group, block, slots)
        if group.nodes == 1:
            continue
        if leader:
            yield from ring_schedule(block, group.leaders, tag)
        if local > 1:
            yield from _share_total(group, block, slots, slice(None) if leader else None)


# ---------------------------------------------------------------------------- sharded halves (--zero)


def _own_part(chunks, rank: int, start: int, size: int) -> slice:
    """The part of the block [start, start + size) of the buffer in rank's chunk, as a slice of the block."""
    first, stop = chunks[rank]
    lo = min(max(first - start, 0), size)
    return slice(lo, max(lo, min(stop - start, size)))


def _node_blocks(group: NodeGroup, buf: np.ndarray):
    """(start, block, slots) for each slot-sized block of buf, the node's slots grown to hold one."""
    block_size = block_bytes(buf.nbytes)
    per_block = block_size // buf.itemsize
    slots = group.slots(buf.dtype, block_size)
    for start in range(0, buf.size, per_block):
        yield start, buf[start:start + per_block], slots


def hier_reduce_scatter_schedule(buf: np.ndarray, comm: MPI.Intracomm, chunks, tag: int = _TAG):
    """Schedule (reduce-scatter): buf[chunks[rank]] <- the sum over the ranks of comm of that range
    (chunks: [start, stop) per rank, contiguous, possibly empty); the rest of buf is left holding
    partial sums. Collective on comm.

    On one node, in shared memory: block by block every rank copies its block into its slot and,
    after the node barrier, sums only its own chunk's part of the block over the slots, in
    local-rank order (hier_schedule's order, so the sum has the bits of its all-reduce): each rank
    adds 1/L of the buffer from L slots instead of all of it. Across nodes, hier_schedule's
    all-reduce of the whole buffer, of which the caller reads its chunk."""
    if comm.size == 1 or buf.size == 0:
        return
    group = node_group(comm)
    if group.nodes > 1:
        yield from hier_schedule(buf, comm, tag)
        return
    for start, block, slots in _node_blocks(group, buf):
        yield from _sum_in_node(group, block, slots, _own_part(chunks, comm.rank, start, block.size))


def hier_allgather_schedule(buf: np.ndarray, comm: MPI.Intracomm, chunks, tag: int = _TAG):
    """Schedule (all-gather): every rank's buf[chunks[q]] <- rank q's buf[chunks[q]]. Collective on comm.

    On one node, in shared memory: block by block each rank writes its chunk's part of the block
    into one shared slot (the first of the block's set: sets alternate by block as in the sum, so
    a rank writing the next block never overwrites what a slower one still copies out) and, after
    the node barrier, copies the rest of the block out of it: one copy in and one out per rank,
    no message. Across nodes, the pipelined ring all-gather."""
    if comm.size == 1 or buf.size == 0:
        return
    group = node_group(comm)
    if group.nodes > 1:
        yield from allgather_schedule(buf, comm, chunks=chunks)
        return
    for start, block, slots in _node_blocks(group, buf):
        shared = slots[(group.blocks % 2) * group.node.size, :block.size]
        group.blocks += 1
        part = _own_part(chunks, comm.rank, start, block.size)
        shared[part] = block[part]
        yield from group.barrier()
        block[:part.start] = shared[:part.start]
        block[part.stop:] = shared[part.stop:]
