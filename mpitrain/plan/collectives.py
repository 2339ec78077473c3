"""Bytes and alpha-beta time of each collective as mpitrain implements it (comm/ring.py, rd.py,
hier.py, allreduce.py), for one rank of a group.

Bytes are exact: they count what comm/traffic.py counts for the same call, so the plan's bytes per
rank equal the metrics'. Times follow the latency-bandwidth model (Hockney; Thakur, Rabenseifner
and Gropp, "Optimization of collective communication operations in MPICH", IJHPCA 2005): a message
of n bytes costs alpha + n beta on its link, plus the Python cost of posting it (message_overhead_s),
and every sum adds 3 n / bandwidth (two reads, one write).

A group is described by `Group(size, nodes, local)`: ranks, nodes they span, most ranks on one node.
A group inside one node uses the intra-node link, else the inter-node one (the slowest link paces a ring).
"""

import bisect
import math
from dataclasses import dataclass

import numpy as np

from mpitrain.comm.hier import TWO_LEVEL_BYTES, block_bytes, two_level
from mpitrain.comm.ring import SEGMENT_BYTES, chunk_bounds
from mpitrain.comm.traffic import ring_equivalent


@dataclass(frozen=True)
class Group:
    """size ranks over `nodes` nodes, at most `local` of them on one node."""

    size: int
    nodes: int = 1
    local: int = 1


def group_of(world_ranks: list[int], ranks_per_node: int) -> Group:
    """The Group of these world ranks when each node holds ranks_per_node consecutive ranks."""
    per_node: dict[int, int] = {}
    for rank in world_ranks:
        per_node[rank // ranks_per_node] = per_node.get(rank // ranks_per_node, 0) + 1
    return Group(len(world_ranks), len(per_node), max(per_node.values()))


# ---------------------------------------------------------------------------- bytes (exact)


def ring_sent(count: int, size: int, rank):
    """Elements rank `rank` (an int, or a NumPy array of ranks) sends in the ring all-reduce of
    `count` elements over `size` ranks: every chunk but its own in reduce-scatter, every chunk but
    its right neighbour's in all-gather, (n - c_r) + (n - c_{r+1}); 2(p-1)/p n when p divides n."""
    if size == 1 or count == 0:
        return rank * 0
    base, extra = divmod(count, size)
    own, right = base + (rank < extra), base + ((rank + 1) % size < extra)
    return 2 * count - own - right


def rd_sent(count: int, size: int, rank):
    """Elements rank `rank` (int or array) sends in recursive doubling: the whole buffer per round,
    log2 of the largest power of two <= size rounds, one more for the odd ranks that fold a pair
    (one in all for the even ones)."""
    if size == 1 or count == 0:
        return rank * 0
    pof2 = 1 << (size.bit_length() - 1)
    extra = size - pof2
    rounds = pof2.bit_length() - 1
    folded = rank < 2 * extra
    return np.where(folded, np.where(rank % 2 == 0, count, (rounds + 1) * count), rounds * count)


def hier_sent(count: int, itemsize: int, node_index, local_rank, node_sizes: list[int],
              two_level_bytes: int | None = TWO_LEVEL_BYTES):
    """Elements each rank (node_index, local_rank: arrays over the group's ranks; node_sizes: the
    group's ranks on each node) sends in the hierarchical all-reduce, block by block: none within
    a node (shared memory); across nodes of equal size L > 1 for buffers of at least
    two_level_bytes (what `mpitrain tune` measured, else hier.TWO_LEVEL_BYTES), local rank j rings
    chunk j of each block with the local ranks j of the other nodes; otherwise each node's leader
    rings the block."""
    nodes = len(node_sizes)
    if nodes == 1 or count == 0:
        return node_index * 0
    per_block = block_bytes(count * itemsize) // itemsize
    blocks = [min(per_block, count - start) for start in range(0, count, per_block)]
    local = node_sizes[0]
    if two_level(count * itemsize, node_sizes, two_level_bytes):
        chunks = [[b - a for a, b in chunk_bounds(block, local)] for block in blocks]
        return np.array([sum(ring_sent(sizes[j], nodes, int(n)) for sizes in chunks)
                         for n, j in zip(node_index.tolist(), local_rank.tolist())])
    sent = sum(ring_sent(block, nodes, node_index) for block in blocks)
    return np.where(local_rank == 0, sent, 0)


def mpi_sent_bytes(nbytes: int, size: int) -> int:
    """MPI's own Allreduce, counted as 2(p-1)/p of the buffer (comm/traffic.py)."""
    return ring_equivalent(nbytes, size) if size > 1 else 0


# ---------------------------------------------------------------------------- time (alpha-beta)


def link(profile: dict, group: Group) -> tuple[float, float]:
    """(alpha, beta) of the link that paces a group: intra-node within one node, else inter-node."""
    entry = profile["links"]["intra" if group.nodes <= 1 else "inter"]
    return entry["alpha_s"], entry["beta_s_per_byte"]


def p2p_time(profile: dict, nbytes: float, same_node: bool) -> float:
    """One point-to-point message: alpha + n beta + the Python cost of posting it."""
    entry = profile["links"]["intra" if same_node else "inter"]
    return entry["alpha_s"] + nbytes * entry["beta_s_per_byte"] + profile["message_overhead_s"]


def ring_time(profile: dict, nbytes: float, group: Group, bandwidth: float) -> float:
    """Pipelined ring: 2(p-1) steps of n/p bytes, each chunk cut into 1 MiB segments (one message
    each); the reduce-scatter half adds (p-1)/p n bytes into place."""
    p = group.size
    if p == 1 or nbytes == 0:
        return 0.0
    alpha, beta = link(profile, group)
    segments = max(1, math.ceil(nbytes / p / SEGMENT_BYTES))
    messages = 2 * (p - 1) * segments
    return (messages * (alpha + profile["message_overhead_s"]) + 2 * (p - 1) / p * nbytes * beta
            + (p - 1) / p * nbytes * 3 / bandwidth)


def rd_time(profile: dict, nbytes: float, group: Group, bandwidth: float) -> float:
    """Recursive doubling: log2(p') rounds of the whole buffer (p' the largest power of two <= p),
    two more (fold and hand back) when p is not a power of two; each round adds n bytes."""
    p = group.size
    if p == 1 or nbytes == 0:
        return 0.0
    alpha, beta = link(profile, group)
    pof2 = 1 << (p.bit_length() - 1)
    rounds = pof2.bit_length() - 1
    folds = 2 if p > pof2 else 0
    return ((rounds + folds) * (alpha + profile["message_overhead_s"] + nbytes * beta)
            + (rounds + folds // 2) * nbytes * 3 / bandwidth)


def hier_time(profile: dict, nbytes: float, group: Group, bandwidth: float) -> float:
    """Hierarchical: per block of at most 4 MiB, copy into a shared slot, a node barrier, sum the
    L slots; across nodes the leaders ring the block, then a second barrier and a copy out."""
    if group.size == 1 or nbytes == 0:
        return 0.0
    alpha = profile["links"]["intra"]["alpha_s"]
    block = block_bytes(int(nbytes))
    blocks = math.ceil(nbytes / block)
    barrier = math.ceil(math.log2(max(group.local, 2))) * (alpha + profile["message_overhead_s"])
    in_node = (nbytes * (group.local + 2) / bandwidth + blocks * barrier) if group.local > 1 else 0.0
    if group.nodes == 1:
        return in_node
    leaders = Group(group.nodes, group.nodes, 1)
    across = blocks * ring_time(profile, min(nbytes, block), leaders, bandwidth)
    copy_out = (2 * nbytes / bandwidth + blocks * barrier) if group.local > 1 else 0.0
    return in_node + across + copy_out


def mpi_time(profile: dict, nbytes: float, group: Group, bandwidth: float) -> float:
    """MPI's Allreduce (MPICH): recursive doubling for short buffers, reduce-scatter + all-gather for
    long ones, whichever the model finds faster, with one Python call instead of one per message."""
    if group.size == 1:
        return 0.0
    free = {**profile, "message_overhead_s": 0.0}
    return profile["message_overhead_s"] + min(rd_time(free, nbytes, group, bandwidth),
                                                       ring_time(free, max(nbytes, group.size), group, bandwidth))


FORMULAS = {"ring": ring_time, "rd": rd_time, "hier": hier_time, "mpi": mpi_time}


def measured(profile: dict, algorithm: str, group: Group, kind: str = "allreduce") -> dict | None:
    """The measured curve of this algorithm for a group of this many ranks and nodes, if any: of its
    all-reduce, or with kind="halves" of its reduce-scatter + all-gather pair (--zero)."""
    for entry in profile["collectives"]:
        if (entry["algorithm"] == algorithm and entry["ranks"] == group.size and entry["nodes"] == group.nodes
                and entry.get("kind", "allreduce") == kind):
            return entry
    return None


def interpolate(sizes: list[float], seconds: list[float], nbytes: float) -> float:
    """Log-log interpolation of a measured curve; beyond its ends, the time scales with the bytes
    above it (bandwidth-bound) and stays at the first point below it (latency-bound)."""
    pairs = sorted(zip(sizes, seconds))
    sizes, seconds = [a for a, _ in pairs], [b for _, b in pairs]
    if nbytes <= sizes[0]:
        return seconds[0]
    if nbytes >= sizes[-1]:
        return seconds[-1] * nbytes / sizes[-1]
    i = bisect.bisect_right(sizes, nbytes)
    x0, x1, y0, y1 = sizes[i - 1], sizes[i], seconds[i - 1], seconds[i]
    weight = math.log(nbytes / x0) / math.log(x1 / x0)
    return math.exp(math.log(y0) + weight * (math.log(y1) - math.log(y0)))


def allreduce_time(profile: dict, algorithm: str, nbytes: float, group: Group, bandwidth: float) -> float:
    """Seconds of one all-reduce of nbytes over the group: the measured curve where the profile has
    one for this algorithm and group, else the algorithm's alpha-beta formula."""
    if group.size == 1 or nbytes == 0:
        return 0.0
    curve = measured(profile, algorithm, group)
    if curve is not None:
        return interpolate(curve["bytes"], curve["seconds"], nbytes)
    return FORMULAS[algorithm](profile, nbytes, group, bandwidth)
