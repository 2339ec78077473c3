"""The tensor-parallel algebra: every exchange a sliced layer needs, as one named forward/backward pair.

A tensor group of T ranks slices a (B, width) activation by columns: rank t holds columns
[start_t, stop_t) from chunk_bounds(width, T) (widths that T does not divide give slices one
column apart; a slice may be empty). With X (B, in) and A split into column blocks A_t:

    CopyToTP      forward: identity          backward: sum over the group   (X enters every A_t)
    ReduceFromTP  forward: sum over the group backward: identity            (Y = sum_t X_t A_t)
    GatherFromTP  forward: all-gather slices backward: keep own slice       (Y = [Y_1 .. Y_T])
    ScatterToTP   forward: keep own slice    backward: all-gather slices    (X_t = X[:, own])

A column -> activation -> row block is CopyToTP ... ReduceFromTP: one sum in forward, one in
backward. Sums and gathers are comm/ring.py's ring collectives on the group's own
communicator; CuPy arrays pass through host memory because the MPI wheel is not CUDA-aware.
"""

import numpy as np
from mpi4py import MPI

from mpitrain.backend import to_host
from mpitrain.comm import traffic
from mpitrain.comm.fingerprint import CHECK
from mpitrain.comm.ring import allgather_schedule, chunk_bounds, complete, ring_schedule
from mpitrain.trace import TRACE


class TensorGroup:
    """The T ranks that share every sliced layer of one pipeline stage, and the bytes they have sent."""

    def __init__(self, comm: MPI.Intracomm | None, xp=np):
        """comm None: a group of one (no tensor parallelism), which never communicates."""
        self.comm, self.xp = comm, xp
        self.rank, self.size = (comm.rank, comm.size) if comm is not None else (0, 1)
        self.bytes_sent = 0
        # The exchanges run inside backward while a gradient bucket's ring may have receives
        # posted into the collectives' shared scratch: the group receives into its own.
        self._scratch: dict = {}

    def bounds(self, width: int) -> list[tuple[int, int]]:
        """[start, stop) of every rank's column slice of a `width`-wide activation."""
        return chunk_bounds(width, self.size)

    def own(self, width: int) -> slice:
        start, stop = self.bounds(width)[self.rank]
        return slice(start, stop)

    def sum(self, a):
        """a <- sum of a over the group, in place (a contiguous). Collective on the group."""
        if self.size == 1:
            return a
        host = to_host(a)
        if CHECK.active:
            CHECK.collective(self.comm, "tensor-parallel sum", "ring", host, depth=1)
        before = traffic.sent()
        if TRACE.active:
            started = TRACE.now()
        complete(ring_schedule(host.reshape(-1), self.comm, cache=self._scratch), "tensor-parallel sum")
        self.bytes_sent += traffic.sent() - before
        if TRACE.active:
            TRACE.span("tensor-parallel", f"sum {host.nbytes} B", started, bytes=traffic.sent() - before,
                       buffer_bytes=host.nbytes, ranks=self.size)
        if host is not a:
            a.set(host)
        return a

    def gather(self, local, width: int):
        """(B, own columns) on every rank -> the whole (B, width). Collective on the group.

        The slices travel as one flat buffer, slice t at [B*start_t, B*stop_t): contiguous per
        rank whatever the widths, then are laid side by side.
        """
        if self.size == 1:
            return local
        rows = local.shape[0]
        column_bounds = self.bounds(width)
        flat_bounds = [(rows * start, rows * stop) for start, stop in column_bounds]
        flat = np.empty(rows * width, dtype=local.dtype)
        start, stop = flat_bounds[self.rank]
        flat[start:stop] = to_host(local).reshape(-1)
        if CHECK.active:
            CHECK.collective(self.comm, "tensor-parallel gather", "ring", flat, depth=1)
        before = traffic.sent()
        if TRACE.active:
            started = TRACE.now()
        complete(allgather_schedule(flat, self.comm, chunks=flat_bounds), "tensor-parallel all-gather")
        self.bytes_sent += traffic.sent() - before
        if TRACE.active:
            TRACE.span("tensor-parallel", f"all-gather {flat.nbytes} B", started, bytes=traffic.sent() - before,
                       buffer_bytes=flat.nbytes, ranks=self.size)
        blocks = [flat[rows * a:rows * b].reshape(rows, b - a) for a, b in column_bounds]
        return self.xp.asarray(np.concatenate(blocks, axis=1))


class CopyToTP:
    """forward: identity, every rank already holds the whole X; backward: sum dX over the group,
    because each rank's A_t saw all of X and contributes a partial dX = dY_t A_t^T."""

    @staticmethod
    def forward(x, group: TensorGroup):
        return x

    @staticmethod
    def backward(dx, group: TensorGroup):
        return group.sum(dx)


class ReduceFromTP:
    """forward: sum the partial outputs X_t A_t over the group (in place); backward: identity,
    dY is whole on every rank and is exactly what each partial product needs."""

    @staticmethod
    def forward(partial, group: TensorGroup):
        return group.sum(partial)

    @staticmethod
    def backward(dy, group: TensorGroup):
        return dy


class GatherFromTP:
    """forward: all-gather the column slices Y_t into the whole (B, width) Y; backward: keep
    this rank's columns of dY, the only part its slice influenced."""

    @staticmethod
    def forward(local, group: TensorGroup, width: int):
        return group.gather(local, width)

    @staticmethod
    def backward(dy, group: TensorGroup, width: int):
        return dy[:, group.own(width)]


class ScatterToTP:
    """forward: keep this rank's columns of the whole X; backward: all-gather the slices of dX."""

    @staticmethod
    def forward(x, group: TensorGroup, width: int):
        return x[:, group.own(width)]

    @staticmethod
    def backward(dx_local, group: TensorGroup, width: int):
        return group.gather(dx_local, width)
