"""Recursive doubling all-reduce: log2(p) exchanges of the whole buffer, for short buffers.

In round i every rank swaps its partial sum with the rank whose index differs in bit i and adds
it, so after log2(p) rounds everyone holds the total: the fewest messages of any all-reduce,
at the price of sending the whole buffer each round (the ring sends 2(p-1)/p of it in total).

A world that is not a power of two is folded first (as in MPICH): of the first 2r ranks
(r = p - 2^floor(log2 p)), each even rank hands its buffer to the odd rank above it and waits;
the remaining 2^floor(log2 p) ranks double; the odd ranks then hand the result back down.
Both ranks of a pair add the same two operands, so every rank ends with identical bits.
"""

import numpy as np
from mpi4py import MPI

from mpitrain.comm import traffic
from mpitrain.comm.ring import scratch_buffer

_TAG = 130


def rd_schedule(buf: np.ndarray, comm: MPI.Intracomm, tag: int = _TAG):
    """Schedule: buf <- sum over ranks, in place, by recursive doubling (see the module docstring)."""
    size, rank = comm.size, comm.rank
    if size == 1 or buf.size == 0:
        return
    pof2 = 1 << (size.bit_length() - 1)
    extra = size - pof2
    incoming = scratch_buffer(buf.dtype, buf.size)[: buf.size]

    if rank < 2 * extra and rank % 2 == 0:
        yield [traffic.isend(comm, buf, rank + 1, tag)]
        yield [comm.Irecv(buf, rank + 1, tag + 2)]
        return
    if rank < 2 * extra:
        yield [comm.Irecv(incoming, rank - 1, tag)]
        np.add(buf, incoming, out=buf)
    folded = rank // 2 if rank < 2 * extra else rank - extra

    mask = 1
    while mask < pof2:
        partner_folded = folded ^ mask
        partner = 2 * partner_folded + 1 if partner_folded < extra else partner_folded + extra
        yield [comm.Irecv(incoming, partner, tag + 1), traffic.isend(comm, buf, partner, tag + 1)]
        np.add(buf, incoming, out=buf)
        mask <<= 1

    if rank < 2 * extra:
        yield [traffic.isend(comm, buf, rank - 1, tag + 2)]
