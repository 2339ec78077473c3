"""Ring all-reduce written out: reduce-scatter then all-gather over point-to-point messages.

The buffer is cut into `size` chunks. In reduce-scatter step k, rank r sends chunk (r - k) to
its right neighbour and adds chunk (r - k - 1) from its left neighbour into place; after size-1
steps rank r holds the full sum of chunk (r + 1). All-gather then passes the finished chunks
around the ring once more. Each rank sends 2(p-1)/p of the buffer: bandwidth-optimal.
"""

import numpy as np
from mpi4py import MPI

_TAG_REDUCE_SCATTER = 101
_TAG_ALLGATHER = 102

_scratch: dict[np.dtype, np.ndarray] = {}


def chunk_bounds(length: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) of each rank's chunk: equal blocks, the remainder on the first chunks."""
    base, extra = divmod(length, size)
    bounds, start = [], 0
    for i in range(size):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _scratch_for(dtype: np.dtype, count: int) -> np.ndarray:
    """A receive buffer of at least `count` elements, reused across calls (grown, never shrunk)."""
    buf = _scratch.get(dtype)
    if buf is None or buf.size < count:
        buf = np.empty(max(count, 1), dtype=dtype)
        _scratch[dtype] = buf
    return buf


def ring_allreduce(buf: np.ndarray, comm: MPI.Intracomm) -> None:
    """buf <- sum of buf over all ranks, in place; buf is 1-D, contiguous, host. Collective on comm."""
    size, rank = comm.size, comm.rank
    if size == 1:
        return
    bounds = chunk_bounds(buf.size, size)
    scratch = _scratch_for(buf.dtype, bounds[0][1] - bounds[0][0])
    right, left = (rank + 1) % size, (rank - 1) % size

    for step in range(size - 1):
        send_start, send_stop = bounds[(rank - step) % size]
        recv_start, recv_stop = bounds[(rank - step - 1) % size]
        incoming = scratch[: recv_stop - recv_start]
        comm.Sendrecv(buf[send_start:send_stop], right, _TAG_REDUCE_SCATTER,
                      incoming, left, _TAG_REDUCE_SCATTER)
        target = buf[recv_start:recv_stop]
        np.add(target, incoming, out=target)

    for step in range(size - 1):
        send_start, send_stop = bounds[(rank + 1 - step) % size]
        recv_start, recv_stop = bounds[(rank - step) % size]
        comm.Sendrecv(buf[send_start:send_stop], right, _TAG_ALLGATHER,
                      buf[recv_start:recv_stop], left, _TAG_ALLGATHER)
