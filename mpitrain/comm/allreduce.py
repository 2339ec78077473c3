"""The public collectives: `allreduce`, `reduce_scatter`, `allgather`, all in place on a 1-D buffer.

    allreduce(buf, comm, algorithm="auto")   buf <- sum over the ranks of comm
    reduce_scatter(buf, comm) -> (start, stop)   buf[start:stop] <- that chunk's sum over ranks
    allgather(buf, comm)                     every rank's own chunk copied into every rank's buf

Chunks are `chunk_bounds(len(buf), comm.size)`: rank r owns chunk r (equal blocks, remainder on
the first ranks), so `reduce_scatter` then `allgather` is an all-reduce. Each is collective:
call it on every rank of comm with buffers of the same length and dtype.

Host (NumPy) buffers go straight to MPI. Device (CuPy) buffers are synchronized and staged
through a pinned host copy (allocated once per size), since the hand-written algorithms add
chunks on the host and the MPICH wheel is not CUDA-aware; with a CUDA-aware MPI
(backend.cuda_aware_mpi) the `mpi` algorithm takes the device buffer itself.

Algorithms: `ring` (pipelined ring, bandwidth-optimal), `rd` (recursive doubling, fewest
messages), `hier` (shared memory within a node, rings across nodes), `mpi` (MPI
Allreduce), and `auto`, which picks one of them by buffer size and layout from thresholds that
`mpitrain tune` measured (see comm/thresholds.py).
"""

import numpy as np
from mpi4py import MPI

from mpitrain.comm import thresholds, traffic
from mpitrain.comm.fingerprint import CHECK
from mpitrain.comm.hier import hier_allgather_schedule, hier_reduce_scatter_schedule, hier_schedule
from mpitrain.comm.rd import rd_schedule
from mpitrain.comm.ring import (allgather_schedule, chunk_bounds, complete, reduce_scatter_schedule, ring_schedule,
                                scratch_buffer)
from mpitrain.errors import MpitrainError

ALGORITHMS = ("auto", "ring", "rd", "hier", "mpi")


def mpi_schedule(buf: np.ndarray, comm: MPI.Intracomm):
    """Schedule of MPI's own non-blocking all-reduce (counted as 2(p-1)/p of the buffer, see traffic)."""
    traffic.add(traffic.ring_equivalent(buf.nbytes, comm.size))
    yield [comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)]


SCHEDULES = {"ring": ring_schedule, "rd": rd_schedule, "hier": hier_schedule, "mpi": mpi_schedule}


# Kinds of dtype the collectives can sum: signed and unsigned integers, floats, complex numbers.
# A bool buffer is refused at every size rather than ORed by one algorithm (MPI's SUM on MPI.BOOL)
# and refused by another (MPI raises "Invalid MPI_Op" below some size); objects cannot be summed
# by any of them.
SUMMABLE_KINDS = "iufc"


def check_buffer(buf, what: str) -> None:
    """A 1-D contiguous buffer of a summable dtype; raised before any message, on every rank alike
    and at any size, since a mismatch would hang or truncate."""
    if buf.dtype.kind not in SUMMABLE_KINDS:
        raise MpitrainError(f"{what}: a {buf.dtype.name} buffer cannot be summed over ranks; use an integer, "
                            f"floating or complex dtype (uint8 for flags)")
    if buf.ndim != 1 or not buf.flags.c_contiguous:
        raise MpitrainError(f"{what} needs a 1-D contiguous buffer, got shape {buf.shape}")


def resolve(algorithm: str, nbytes: int, comm: MPI.Intracomm, sharded: bool = False) -> str:
    """The concrete algorithm for `algorithm` ("auto" looks up the measured thresholds, of the
    all-reduce or with sharded=True of the reduce-scatter + all-gather pair; collective)."""
    if algorithm == "auto":
        return thresholds.choose(nbytes, comm, sharded)
    if algorithm not in SCHEDULES:
        raise MpitrainError(f"allreduce algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    return algorithm


def allreduce_schedule(buf, comm: MPI.Intracomm, algorithm: str = "auto"):
    """Schedule of allreduce(buf, comm, algorithm); device buffers are staged on the host around it.

    The checks, the choice of "auto" and --check-collectives' comparison run when the schedule is
    made, not when it first runs: every rank makes a bucket's schedule at the same point of its
    program (the end of the same layer's backward), whereas when it first runs depends on how far
    the previous bucket got. A blocking comparison at the first run deadlocked a grid: one rank
    waited in it for a data-parallel peer that was still in a tensor-parallel sum with a third
    rank, itself waiting in a comparison for the second's tensor-parallel peer."""
    check_buffer(buf, "allreduce")
    if comm.size == 1:
        return iter(())
    name = resolve(algorithm, buf.nbytes, comm)
    if CHECK.active:
        CHECK.collective(comm, "allreduce", name, buf, depth=1)
    # MPI's own all-reduce may take a device buffer itself when MPI is CUDA-aware; the hand-written
    # algorithms add chunks on the host.
    return on_host(buf, lambda host: SCHEDULES[name](host, comm), direct=name == "mpi")


# ---------------------------------------------------------------------------- sharded halves

# Receive buffers of MPI's reduce-scatter (its result may not alias its input); buckets run one at a time.
_mpi_scratch: dict = {}


def _mpi_reduce_scatter(buf: np.ndarray, comm: MPI.Intracomm, chunks):
    """Schedule: MPI's non-blocking Reduce_scatter with these counts, its result copied into place."""
    start, stop = chunks[comm.rank]
    traffic.add((buf.size - (stop - start)) * buf.itemsize)  # what a ring would send (see traffic)
    mine = scratch_buffer(buf.dtype, stop - start, _mpi_scratch)[:stop - start]
    yield [comm.Ireduce_scatter(buf, mine, [b - a for a, b in chunks], op=MPI.SUM)]
    buf[start:stop] = mine


def _mpi_allgather(buf: np.ndarray, comm: MPI.Intracomm, chunks):
    """Schedule: MPI's non-blocking Allgatherv in place."""
    start, stop = chunks[(comm.rank + 1) % comm.size]
    traffic.add((buf.size - (stop - start)) * buf.itemsize)
    counts, displs = [b - a for a, b in chunks], [a for a, _ in chunks]
    yield [comm.Iallgatherv(MPI.IN_PLACE, [buf, counts, displs, MPI._typedict[buf.dtype.char]])]


def shard_reduce_schedule(buf, comm: MPI.Intracomm, algorithm: str, chunks):
    """Schedule (reduce-scatter): buf[chunks[rank]] <- the sum over the ranks of comm of that range;
    the rest of buf is left holding partial sums. chunks: [start, stop) per rank, contiguous, covering
    buf, possibly empty. Collective on comm.

    `auto` picks from the sharded thresholds (comm/thresholds.py), the pair's own measurements.
    ring: the pipelined ring with these chunks; mpi: MPI Reduce_scatter; hier: on one node each rank
    sums its chunk in shared memory, across nodes the whole buffer's hierarchical all-reduce (see
    comm/hier.py). rd has no reduce-scatter of its own (recursive doubling's halving variant is not
    written): it sums the whole of buf and the caller reads its chunk. Checked when made, like
    allreduce_schedule."""
    check_buffer(buf, "reduce_scatter")
    if comm.size == 1:
        return iter(())
    name = resolve(algorithm, buf.nbytes, comm, sharded=True)
    if CHECK.active:
        CHECK.collective(comm, "reduce_scatter", name, buf, depth=1)
    if name == "ring":
        schedule = lambda host: reduce_scatter_schedule(host, comm, chunks=chunks)  # noqa: E731
    elif name == "mpi":
        schedule = lambda host: _mpi_reduce_scatter(host, comm, chunks)  # noqa: E731
    elif name == "hier":
        schedule = lambda host: hier_reduce_scatter_schedule(host, comm, chunks)  # noqa: E731
    else:
        schedule = lambda host: SCHEDULES[name](host, comm)  # noqa: E731
    return on_host(buf, schedule)


def shard_gather_schedule(buf, comm: MPI.Intracomm, algorithm: str, chunks):
    """Schedule (all-gather): every rank's buf[chunks[q]] <- rank q's buf[chunks[q]]. Collective on comm.
    The algorithm the reduce-scatter of the same buffer used (auto's sharded choice for its size): mpi: MPI
    Allgatherv; hier: shared memory on one node, the ring across nodes (comm/hier.py); the others:
    the pipelined ring (the all-gather half of the ring is bandwidth-optimal whatever sums the
    reduce-scatter did). Checked when made."""
    check_buffer(buf, "allgather")
    if comm.size == 1:
        return iter(())
    name = resolve(algorithm, buf.nbytes, comm, sharded=True)
    name = name if name in ("mpi", "hier") else "ring"
    if CHECK.active:
        CHECK.collective(comm, "allgather", name, buf, depth=1)
    if name == "mpi":
        schedule = lambda host: _mpi_allgather(host, comm, chunks)  # noqa: E731
    elif name == "hier":
        schedule = lambda host: hier_allgather_schedule(host, comm, chunks)  # noqa: E731
    else:
        schedule = lambda host: allgather_schedule(host, comm, chunks=chunks)  # noqa: E731
    return on_host(buf, schedule)


def on_host(buf, schedule, direct: bool = False):
    """Schedule: schedule(buf) on buf, or on a pinned host copy of a device buffer (MPICH's wheel is
    not CUDA-aware); with direct=True and a CUDA-aware MPI, on the device buffer itself after a
    stream synchronize (backend.for_mpi)."""
    if isinstance(buf, np.ndarray):
        yield from schedule(buf)
        return
    from mpitrain.backend import cuda_aware_mpi, for_mpi, staged_on_host

    if direct and cuda_aware_mpi():
        yield from schedule(for_mpi(buf))
        return

    with staged_on_host(buf) as host:
        yield from schedule(host)


def allreduce(buf, comm: MPI.Intracomm, algorithm: str = "auto") -> None:
    """buf <- sum of buf over the ranks of comm, in place; 1-D contiguous NumPy or CuPy. Collective."""
    if algorithm not in ALGORITHMS:
        raise MpitrainError(f"allreduce algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    check_buffer(buf, "allreduce")
    if comm.size == 1:
        return
    name = thresholds.choose(buf.nbytes, comm) if algorithm == "auto" else algorithm
    if CHECK.active:
        CHECK.collective(comm, "allreduce", name, buf, depth=1)
    if isinstance(buf, np.ndarray):
        if name == "mpi":
            traffic.add(traffic.ring_equivalent(buf.nbytes, comm.size))
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        else:
            complete(SCHEDULES[name](buf, comm))
        return
    complete(on_host(buf, lambda host: SCHEDULES[name](host, comm), direct=name == "mpi"))


def reduce_scatter(buf, comm: MPI.Intracomm) -> tuple[int, int]:
    """Sum chunk `rank` over ranks into buf[start:stop] and return (start, stop). Collective.

    (start, stop) = chunk_bounds(len(buf), comm.size)[comm.rank]. The rest of buf is left holding
    partial sums: overwrite it (allgather does) before reading it.
    """
    check_buffer(buf, "reduce_scatter")
    if CHECK.active:
        CHECK.collective(comm, "reduce_scatter", "ring", buf, depth=1)
    complete(on_host(buf, lambda host: reduce_scatter_schedule(host, comm)))
    return chunk_bounds(buf.size, comm.size)[comm.rank]


def allgather(buf, comm: MPI.Intracomm) -> None:
    """Fill buf from every rank's own chunk: chunk q <- rank q's buf[chunk_bounds(n, p)[q]]. Collective."""
    check_buffer(buf, "allgather")
    if CHECK.active:
        CHECK.collective(comm, "allgather", "ring", buf, depth=1)
    complete(on_host(buf, lambda host: allgather_schedule(host, comm)))
