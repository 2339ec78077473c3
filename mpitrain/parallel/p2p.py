"""Ring reduce-scatter and all-gather written out in point-to-point calls, for the tensor group.

Semantics (the same as mpitrain.comm's collectives, so either can serve the other's callers):
a 1-D contiguous host buffer `buf` is cut into one chunk per rank, chunk c = buf[start_c:stop_c]
with bounds from `chunk_bounds(len(buf), size)` unless the caller passes its own (an all-gather
of unequal column slices needs them).

    reduce_scatter(buf, comm)  afterwards buf's chunk `rank` holds the sum over ranks of that chunk
    allgather(buf, comm)       afterwards every rank's buf holds every rank's own chunk
    allreduce(buf, comm)       reduce_scatter then allgather: buf <- sum over ranks

Ring step k: send one chunk to the right neighbour, receive one from the left (one Sendrecv, so
neighbours never wait on each other), p-1 steps per phase; each rank sends (p-1)/p of the buffer
per phase, the bandwidth optimum. Every function returns the bytes this rank sent.
"""

import numpy as np
from mpi4py import MPI

from mpitrain.comm.ring import chunk_bounds, scratch_buffer

_TAG_REDUCE_SCATTER = 201
_TAG_ALLGATHER = 202

_scratch: dict[np.dtype, np.ndarray] = {}


def reduce_scatter(buf: np.ndarray, comm: MPI.Intracomm, bounds=None) -> int:
    """buf[bounds[rank]] <- sum over ranks of that chunk; the rest of buf is left partly summed.

    Step k: send chunk (rank-k-1), receive chunk (rank-k-2) and add it in; the last chunk to
    arrive is the rank's own, complete. Collective on comm.
    """
    size, rank = comm.size, comm.rank
    if size == 1:
        return 0
    bounds = bounds or chunk_bounds(buf.size, size)
    scratch = scratch_buffer(buf.dtype, max(stop - start for start, stop in bounds), _scratch)
    right, left = (rank + 1) % size, (rank - 1) % size
    sent = 0
    for step in range(size - 1):
        send_start, send_stop = bounds[(rank - step - 1) % size]
        recv_start, recv_stop = bounds[(rank - step - 2) % size]
        incoming = scratch[: recv_stop - recv_start]
        comm.Sendrecv(buf[send_start:send_stop], right, _TAG_REDUCE_SCATTER, incoming, left, _TAG_REDUCE_SCATTER)
        target = buf[recv_start:recv_stop]
        np.add(target, incoming, out=target)
        sent += (send_stop - send_start) * buf.itemsize
    return sent


def allgather(buf: np.ndarray, comm: MPI.Intracomm, bounds=None) -> int:
    """Every rank's buf <- all chunks, chunk r taken from rank r. Collective on comm.

    Step k: pass on chunk (rank-k) (own chunk first), receive chunk (rank-k-1) in place.
    """
    size, rank = comm.size, comm.rank
    if size == 1:
        return 0
    bounds = bounds or chunk_bounds(buf.size, size)
    right, left = (rank + 1) % size, (rank - 1) % size
    sent = 0
    for step in range(size - 1):
        send_start, send_stop = bounds[(rank - step) % size]
        recv_start, recv_stop = bounds[(rank - step - 1) % size]
        comm.Sendrecv(buf[send_start:send_stop], right, _TAG_ALLGATHER, buf[recv_start:recv_stop], left, _TAG_ALLGATHER)
        sent += (send_stop - send_start) * buf.itemsize
    return sent


def allreduce(buf: np.ndarray, comm: MPI.Intracomm) -> int:
    """buf <- sum of buf over ranks, in place: reduce_scatter then allgather. Collective on comm."""
    return reduce_scatter(buf, comm) + allgather(buf, comm)
