"""Compressed gradient sums: buckets travel as float16 or bfloat16, and are summed in the
parameters' dtype.

    sum = CompressedSum(np.dtype("float16"), error_feedback=True)
    complete(sum.schedule(bucket, comm, chunks, gather=True))   # bucket <- the sum, rounded once

Reduce-scatter by direct exchange: each rank rounds its own gradient once to the wire dtype and
sends every owner its chunk; the owner adds the p rounded contributions in rank order in the
parameters' dtype. A ring would round every partial sum again at each hop (p - 1 roundings,
growing with the sum), and sends the same (p-1)/p of the bucket per rank: on 2 ranks the two are
the same messages. With gather (the all-reduce of --zero 0) each owner rounds its sum once more
and the ring all-gathers the wire-dtype chunks: every rank ends with the same bits, and the bytes
of both halves are halved. Under --zero 1, 2 only the reduce-scatter is compressed; the
parameters are all-gathered in full precision.

Error feedback (Seide et al. 2014, "1-bit SGD"; Karimireddy et al. 2019, "Error feedback fixes
SignSGD"): what rounding a rank's gradient lost at step t is added to its gradient at step t + 1,
so the rounding errors do not accumulate over steps: sum_t sent_t = sum_t g_t - e_T. The owner's
second rounding under gather is fed back the same way, through its own next contribution to that
chunk. The residual lives for the run (a resumed run starts from zero).

bfloat16 comes from ml_dtypes (`pip install ml_dtypes`, the `compress` extra); every wire dtype
travels as unsigned integers of its size, which MPI moves without knowing what they hold.
"""

import numpy as np
from mpi4py import MPI

from mpitrain.comm import traffic
from mpitrain.comm.allreduce import check_buffer, on_host
from mpitrain.comm.fingerprint import CHECK
from mpitrain.comm.ring import allgather_schedule
from mpitrain.errors import MpitrainError

_TAG_EXCHANGE = 150
_TAG_GATHER = 152


def wire_dtype(name: str) -> np.dtype:
    """The numpy dtype of a --grad-dtype name; raises MpitrainError when bfloat16's package is missing."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ModuleNotFoundError:
            raise MpitrainError("--grad-dtype bfloat16 needs the ml_dtypes package: pip install ml_dtypes "
                                "(or mpitrain[compress])") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class CompressedSum:
    """Sums of 1-D buffers exchanged in `wire` dtype, with an optional error-feedback residual per
    buffer (each gradient bucket has its own). Buffers are
    allocated on a bucket's first sum and reused: nothing is allocated per step after the first."""

    def __init__(self, wire: np.dtype, error_feedback: bool = False):
        self.wire, self.error_feedback = np.dtype(wire), error_feedback
        self._state: dict[tuple[int, int], tuple] = {}

    def _buffers(self, key, buf: np.ndarray, comm: MPI.Intracomm, largest_chunk: int):
        state = self._state.get(key)
        if state is None:
            state = (np.empty(buf.size, self.wire),                               # this rank's rounded gradient
                     np.empty((comm.size, max(largest_chunk, 1)), self.wire),   # contributions to my chunk
                     np.zeros(buf.size, buf.dtype) if self.error_feedback else None,   # what rounding lost
                     np.empty(buf.size, buf.dtype) if self.error_feedback else None)   # gradient + residual
            self._state[key] = state
        return state

    def nbytes(self) -> int:
        """Bytes held for the exchange (wire copies, receive slots, residuals)."""
        return sum(a.nbytes for state in self._state.values() for a in state if a is not None)

    def schedule(self, buf, comm: MPI.Intracomm, chunks, gather: bool):
        """Schedule: buf[chunks[rank]] <- sum over ranks (in buf's dtype, of rounded contributions);
        with gather every rank's whole buf <- the sum rounded once more (an all-reduce). chunks:
        [start, stop) per rank, contiguous and covering buf. Collective on comm; a device buffer
        is staged on the host around it."""
        check_buffer(buf, "compressed gradient sum")
        if comm.size == 1 or buf.size == 0:
            return iter(())
        if CHECK.active:  # when made, not when first run: see allreduce_schedule
            CHECK.collective(comm, "reduce_scatter", f"pairwise {self.wire.name}", buf, depth=1)
        # Keyed by the caller's buffer (a bucket's view lives as long as its GradientSync), not by the
        # host copy: device buckets of one size share one pinned staging buffer.
        key = (id(buf), buf.size)
        return on_host(buf, lambda host: self._exchange(key, host, comm, chunks, gather))

    def _exchange(self, key, buf: np.ndarray, comm: MPI.Intracomm, chunks, gather: bool):
        rank = comm.rank
        wire, slots, residual, exact = self._buffers(key, buf, comm, max(b - a for a, b in chunks))
        if residual is not None:
            np.add(buf, residual, out=exact)
            wire[...] = exact
            np.subtract(exact, wire, out=residual)  # what rounding lost, sent next step
        else:
            wire[...] = buf
        start, stop = chunks[rank]
        bits = np.dtype(f"u{self.wire.itemsize}")  # MPI moves the wire dtype as unsigned integers of its size
        requests = [comm.Irecv(slots[q, :stop - start].view(bits), q, _TAG_EXCHANGE)
                    for q in range(comm.size) if q != rank]
        for q in range(comm.size):
            a, b = chunks[q]
            if q != rank:
                requests.append(traffic.isend(comm, wire[a:b].view(bits), q, _TAG_EXCHANGE))
        slots[rank, :stop - start] = wire[start:stop]
        yield requests
        mine = buf[start:stop]
        mine[...] = slots[0, :stop - start]
        for q in range(1, comm.size):
            np.add(mine, slots[q, :stop - start], out=mine)
        if not gather:
            return
        wire[start:stop] = mine
        if residual is not None:  # the owner's rounding of the sum is fed back through its next contribution
            lost = exact[start:stop]
            np.subtract(mine, wire[start:stop], out=lost)
            residual[start:stop] += lost
        mine[...] = wire[start:stop]  # the owner keeps the rounded sum the others receive
        yield from allgather_schedule(wire.view(bits), comm, _TAG_GATHER, chunks)
        for q, (a, b) in enumerate(chunks):
            if q != rank:
                buf[a:b] = wire[a:b]
