"""Bytes this process has handed to MPI in mpitrain's collectives, counted where they are sent.

Every send of a hand-written collective goes through `isend`, so the count is what the chosen
algorithm really sends (a ring sends 2(p-1)/p of the buffer, recursive doubling the whole buffer
per round, the hierarchical all-reduce only its rings across nodes; shared-memory copies are not sends).
MPI's own Allreduce hides its algorithm: it is counted as the bandwidth-optimal 2(p-1)/p of the
buffer, which is what MPICH's reduce-scatter + all-gather sends for large buffers.

Callers measure a piece of work as the difference of `sent()` before and after it: a schedule
runs only inside next(), so the difference around next() is that schedule's bytes alone, even
while other exchanges interleave between the calls.
"""

from mpi4py import MPI

_sent = 0


def sent() -> int:
    """Bytes sent by this process's collectives so far."""
    return _sent


def add(nbytes: int) -> None:
    global _sent
    _sent += int(nbytes)


def isend(comm: MPI.Intracomm, buf, dest: int, tag: int) -> MPI.Request:
    """comm.Isend(buf, dest, tag), counted."""
    add(buf.nbytes)
    return comm.Isend(buf, dest, tag)


def ring_equivalent(nbytes: int, size: int) -> int:
    """2(p-1)/p of nbytes: what a bandwidth-optimal all-reduce sends per rank."""
    return 2 * (size - 1) * nbytes // size
