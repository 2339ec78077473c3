"""Compressed gradient sums: buckets travel as float16 or bfloat16, and are summed in the
parameters' dtype.

    sum = CompressedSum(np.dtype("float16"), error_feedback=True, size=grads.size)
    complete(sum.schedule(grads[a:b], comm, chunks, gather=True, offset=a))   # the bucket <- the sum, rounded once

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
chunk. The residual is one flat array over the whole gradient buffer, each bucket's part found by
the bucket's offset in it (not by the buffer it travels in: --zero 2 reuses two staging slots for
every bucket), so it follows the gradient entries. What matters to the next steps is its sum over
the ranks, since the summed gradient carries every rank's: a checkpoint saves that sum per
parameter entry (residual_sum) and a resumed run gives it to one rank per entry, the others zero
(set_residual), so the sum survives any change of world size or layout. On one rank nothing is
rounded, and a residual restored there is added to the next gradient once.

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
_TAG_RESIDUAL = 154


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
    """Sums of 1-D slices of one flat buffer of `size` entries (the gradient's), exchanged in `wire`
    dtype, with an optional error-feedback residual per entry of that buffer. Buffers are allocated
    on a slice's first sum and reused: nothing is allocated per step after the first."""

    def __init__(self, wire: np.dtype, error_feedback: bool = False, size: int = 0):
        self.wire, self.error_feedback, self.size = np.dtype(wire), error_feedback, size
        self._state: dict[tuple[int, int], tuple] = {}
        self._residual: np.ndarray | None = None  # what rounding lost, per entry; None: zero

    def _buffers(self, key, buf: np.ndarray, comm: MPI.Intracomm, largest_chunk: int):
        state = self._state.get(key)
        if state is None:
            state = (np.empty(buf.size, self.wire),                               # this rank's rounded gradient
                     np.empty((comm.size, max(largest_chunk, 1)), self.wire),   # contributions to my chunk
                     np.empty(buf.size, buf.dtype) if self.error_feedback else None)   # gradient + residual
            self._state[key] = state
        return state

    def nbytes(self) -> int:
        """Bytes held for the exchange (wire copies, receive slots, the residual)."""
        held = sum(a.nbytes for state in self._state.values() for a in state if a is not None)
        return held + (self._residual.nbytes if self._residual is not None else 0)

    def schedule(self, buf, comm: MPI.Intracomm, chunks, gather: bool, offset: int = 0):
        """Schedule: buf[chunks[rank]] <- sum over ranks (in buf's dtype, of rounded contributions);
        with gather every rank's whole buf <- the sum rounded once more (an all-reduce). chunks:
        [start, stop) per rank, contiguous and covering buf. offset: where buf starts in the flat
        buffer (its residual is entries [offset, offset + buf.size)); ValueError, before any
        message, when that lies outside `size` under error feedback. Collective on comm; a device
        buffer is staged on the host around it."""
        check_buffer(buf, "compressed gradient sum")
        if self.error_feedback and not 0 <= offset <= self.size - buf.size:
            raise ValueError(f"compressed gradient sum: entries [{offset}, {offset + buf.size}) lie outside the "
                             f"{self.size}-entry buffer whose residual this CompressedSum keeps")
        if buf.size == 0 or (comm.size == 1 and self._residual is None):
            return iter(())
        if comm.size == 1:  # a residual read from a checkpoint of more ranks: still owed to the gradient
            return on_host(buf, lambda host: self._deliver(offset, host))
        if CHECK.active:  # when made, not when first run: see allreduce_schedule
            CHECK.collective(comm, "reduce_scatter", f"pairwise {self.wire.name}", buf, depth=1)
        # Scratch is keyed by the caller's buffer (a bucket's view lives as long as its GradientSync), not
        # by the host copy: device buckets of one size share one pinned staging buffer.
        key = (id(buf), buf.size)
        return on_host(buf, lambda host: self._exchange(key, offset, host, comm, chunks, gather))

    def _residual_at(self, offset: int, buf: np.ndarray) -> np.ndarray:
        if self._residual is None:
            self._residual = np.zeros(self.size, buf.dtype)
        return self._residual[offset:offset + buf.size]

    def _deliver(self, offset: int, buf: np.ndarray):
        """A schedule that sends nothing: buf += its residual, which is then zero (and freed once all is)."""
        owed = self._residual[offset:offset + buf.size]
        buf += owed
        owed[...] = 0
        if not self._residual.any():
            self._residual = None
        yield from ()

    def _exchange(self, key, offset: int, buf: np.ndarray, comm: MPI.Intracomm, chunks, gather: bool):
        rank = comm.rank
        wire, slots, exact = self._buffers(key, buf, comm, max(b - a for a, b in chunks))
        residual = self._residual_at(offset, buf) if self.error_feedback else None
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

    # ------------------------------------------------------------------------ checkpoints

    def residual_sum(self, comm: MPI.Intracomm, owned: list[tuple[int, int]], dtype) -> np.ndarray:
        """This rank's part of the residual summed over comm: sum over ranks q, in rank order, of q's
        residual[owned[rank]] (the same bits whatever MPI's reduction order), as a new array of
        `dtype` (the residual's). owned: [start, stop) of the flat buffer per rank of comm, disjoint;
        a rank may own nothing. A rank with no residual yet adds zeros. Not a training-step path:
        checkpoints only. Collective on comm."""
        residual = self._residual if self._residual is not None else np.zeros(self.size, dtype)
        if CHECK.active:
            CHECK.collective(comm, "reduce", "residual sum", residual, depth=1)
        sends = [comm.Isend(residual[a:b], q, _TAG_RESIDUAL)
                 for q, (a, b) in enumerate(owned) if q != comm.rank and b > a]
        start, stop = owned[comm.rank]
        total, incoming = np.zeros(stop - start, residual.dtype), np.empty(stop - start, residual.dtype)
        for q in range(comm.size if stop > start else 0):
            if q == comm.rank:
                total += residual[start:stop]
            else:
                comm.Recv(incoming, q, _TAG_RESIDUAL)
                total += incoming
        MPI.Request.Waitall(sends)
        return total

    def set_residual(self, start: int, values: np.ndarray | None) -> None:
        """residual[start:start + values.size] <- values and zero elsewhere (values None: zero
        everywhere), e.g. a checkpoint's summed residual on the rank that takes it. Local."""
        self._residual = None
        if values is not None and values.any():
            self._residual = np.zeros(self.size, values.dtype)
            self._residual[start:start + values.size] = values
