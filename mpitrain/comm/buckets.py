"""Gradient buckets: sum the gradients over ranks while backward is still computing.

Backward produces gradients last layer first. The flat gradient buffer is cut into buckets of
whole dense layers taken in that order (a bucket is closed before a layer would push it past
bucket_mb; a larger layer is a bucket of its own), and since layers are contiguous in the flat
buffer each bucket is a view: nothing is packed or copied. As soon as backward has finished
every layer of a bucket, its all-reduce starts; between later layers the running all-reduces
are advanced by non-blocking tests, and `wait` finishes what is left before the optimizer step.

Overlap mechanism: every collective here is a schedule (a generator of MPI requests, see
comm/ring.py), so "progressing between layers" means testing the pending requests after each
layer and running the schedule on when they are done; no thread is involved. A communication
thread that owned all MPI calls was measured against it (2 ranks on 2 cores, auto, 1 MiB
buckets, medians of 5-7 interleaved runs) and kept slower: 0.93-1.00x the non-blocking
samples/s on 784-1024-10 and 0.63-0.89x on 784-1024-1024-1024-10. It competes with backward
for the same core, spins in MPI while it waits, and pays a thread hand-off per bucket; the
progression costs one Testall per layer.

Sharded (--zero 1, 2; ZeRO, Rajbhandari et al. 2020, "ZeRO: memory optimizations toward training
trillion parameter models"): rank q of comm owns the equal block shards[q] of the flat buffer, and
each bucket is reduce-scattered instead of all-reduced: the parts of the bucket inside shards[q]
are summed on rank q alone (a ring with unequal, possibly empty chunks, or MPI Reduce_scatter).
After the optimizer updated each owner's block, `start_gather` launches the all-gather of the
parameters bucket by bucket in forward order, and the next forward waits for each layer's bucket
just before that layer (`parameters_ready`), so the later buckets travel while the first layers
compute. The two halves send what the all-reduce sends; what they save is that no rank updates,
or keeps optimizer state for, any block but its own.

Compressed (--grad-dtype float16, bfloat16): each bucket's sum is comm/compress.py's exchange in
the narrower dtype instead, summed in the parameters' dtype.

Buckets run one at a time, in launch order, so every rank posts the same collectives in the
same order and the reused scratch and shared-memory slots are never used by two at once.
"""

from collections import deque

import numpy as np
from mpi4py import MPI

from mpitrain.comm import traffic
from mpitrain.comm.allreduce import ALGORITHMS, allreduce_schedule, resolve, shard_gather_schedule, shard_reduce_schedule
from mpitrain.comm.compress import CompressedSum
from mpitrain.comm.hier import reserve
from mpitrain.comm.ring import chunk_bounds, complete
from mpitrain.comm.watchdog import waiting
from mpitrain.errors import MpitrainError
from mpitrain.trace import TRACE

MiB = 1 << 20


def plan_buckets(layer_slices: list[tuple[int, int]], itemsize: int, bucket_mb: float) -> list[tuple[int, int, int]]:
    """(start, stop, first_layer) of each bucket in launch order (the last layers first).

    layer_slices are the contiguous [start, stop) ranges of each dense layer in forward order;
    a bucket is launched once backward is done with its first_layer (the last one it reaches).
    """
    for (_, stop), (start, _) in zip(layer_slices, layer_slices[1:]):
        if stop != start:
            raise ValueError(f"layer slices {layer_slices} are not contiguous")
    limit = bucket_mb * MiB
    buckets = []
    for layer in reversed(range(len(layer_slices))):
        start, stop = layer_slices[layer]
        if buckets and (buckets[-1][1] - start) * itemsize <= limit:
            buckets[-1] = (start, buckets[-1][1], layer)
        else:
            buckets.append((start, stop, layer))
    return buckets


def split_layers(buckets: list[tuple[int, int, int]], layer_slices: list[tuple[int, int]], row_sizes: list[int],
                 limit: int) -> list[tuple[int, int, int]]:
    """--zero 2: `buckets` (plan_buckets) with every one-layer bucket longer than `limit` elements cut
    into pieces of whole weight rows (row_sizes[i]: elements per row of layer i's weight, whose bias
    follows it as one more row), each piece a bucket of its own, last rows first (launch order).
    Backward writes the weight gradient piece by piece (nn/layers.py, Linear.write_grads), so a
    layer that holds most of the model no longer needs a staging slot of its whole size."""
    out = []
    for start, stop, layer in buckets:
        if (start, stop) != tuple(layer_slices[layer]) or stop - start <= limit:
            out.append((start, stop, layer))
            continue
        step = max(1, limit // row_sizes[layer]) * row_sizes[layer]
        cuts = list(range(start, stop, step)) + [stop]
        out += [(a, b, layer) for a, b in reversed(list(zip(cuts[:-1], cuts[1:])))]
    return out


def slot_sizes(bucket_sizes: list[int]) -> tuple[int, int]:
    """--zero 2's two staging slots: the largest even and the largest odd bucket, in launch order."""
    return max(bucket_sizes[0::2]), max(bucket_sizes[1::2], default=0)


def slot_elements(bucket_sizes: list[int]) -> int:
    return sum(slot_sizes(bucket_sizes))


def zero2_buckets(buckets: list[tuple[int, int, int]], layer_slices: list[tuple[int, int]],
                  row_sizes: list[int] | None, limit: int, shards: list[tuple[int, int]], size: int):
    """--zero 2: (the buckets to sum, whether to stage them). Of the buckets as planned and the same
    with layers longer than `limit` cut into pieces of rows (split_layers), the one whose two slots
    are smaller, staged when its slots and the largest shard (decided on the largest, so that every
    rank decides alike) hold fewer elements than the whole gradient of `size`; else the planned
    buckets, unstaged. On a tie the planned buckets: fewer, larger products and messages."""
    candidates = [buckets]
    if row_sizes is not None:
        candidates.append(split_layers(buckets, layer_slices, row_sizes, limit))
    best = min(candidates, key=lambda c: slot_elements([stop - start for start, stop, _ in c]))
    if slot_elements([stop - start for start, stop, _ in best]) + max(b - a for a, b in shards) < size:
        return best, True
    return buckets, False


class GradientSync:
    """grads <- sum over the ranks of comm, bucket by bucket, overlapped with backward. Collective.

        sync = GradientSync(model.grads, model.layer_grad_slices(), comm, "auto", bucket_mb=1.0)
        model.backward(dout, on_layer_done=sync.layer_done)
        sync.wait()                     # grads hold the sum; the optimizer may step

    With overlap=False layer_done does nothing (but free a --zero 2 slot) and wait() sums the same
    buckets one after another, so both modes give bit-identical gradients.

    shards: [start, stop) of the flat buffer per rank of comm (--zero 1, 2): buckets are
    reduce-scattered and `shard_grads` holds this rank's summed block (else all of grads).
    compressed: a CompressedSum for --grad-dtype, of grads.size entries (each bucket's residual is
    found by its offset in grads). shard_only (--zero 2): keep the shard and two staging slots
    instead of grads, where smaller; then `staged` is True and backward must write into
    `layer_grads()` (Model.bind_grads). row_sizes (--zero 2): elements per weight row of each
    layer, to cut layers larger than a bucket into pieces of rows (split_layers).
    """

    def __init__(self, grads, layer_slices, comm: MPI.Intracomm, algorithm: str = "auto",
                 bucket_mb: float = 1.0, overlap: bool = True, shards: list[tuple[int, int]] | None = None,
                 compressed: CompressedSum | None = None, shard_only: bool = False,
                 row_sizes: list[int] | None = None):
        if algorithm not in ALGORITHMS:
            raise MpitrainError(f"--allreduce {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
        if not bucket_mb > 0:
            raise MpitrainError(f"--bucket-mb {bucket_mb}: must be a positive number of MiB")
        self.comm, self.algorithm, self.overlap = comm, algorithm, overlap
        self.layer_slices, self.row_sizes = list(layer_slices), row_sizes
        self.buckets = plan_buckets(self.layer_slices, grads.itemsize, bucket_mb)
        stage = False
        if shard_only and shards is not None:
            self.buckets, stage = zero2_buckets(self.buckets, self.layer_slices, row_sizes,
                                                int(bucket_mb * MiB) // grads.itemsize, shards, grads.size)
        # Buckets that are a part of one layer: launched by that layer's backward, piece by piece.
        self._pieces = {index for index, (start, stop, layer) in enumerate(self.buckets)
                        if (start, stop) != tuple(self.layer_slices[layer]) and
                        self.layer_slices[layer][0] <= start and stop <= self.layer_slices[layer][1]}
        self.views = [grads[start:stop] for start, stop, _ in self.buckets]
        # Sharded (--zero 1, 2): rank q owns shards[q] of the flat buffer; each bucket is reduce-scattered
        # onto the owners of its parts, so the owner alone holds the sum of a gradient entry.
        self.shards, self.compressed = shards, compressed
        self.bucket_chunks = None if shards is None else [
            tuple((min(max(a, start), stop) - start, min(max(b, start), stop) - start) for a, b in shards)
            for start, stop, _ in self.buckets]
        mine = shards[comm.rank] if shards is not None else (0, grads.size)
        self.shard_grads = grads[mine[0]:mine[1]]
        self.staged = stage
        if stage:
            self._stage(grads, mine)
        if comm.size > 1 and (compressed is None or shards is not None):
            # Collective set-up now, at the same point on every rank (see allreduce_schedule): auto's
            # thresholds, and the shared slots of the hierarchical sum (or, sharded, its all-gather
            # of the parameters, compressed sums included) sized for its largest bucket.
            sharded = shards is not None
            hier_bytes = [view.nbytes for view in self.views
                          if resolve(algorithm, view.nbytes, comm, sharded) == "hier"]
            if hier_bytes:
                reserve(comm, grads.dtype, max(hier_bytes))
        self._bucket_of_layer = {first: index for index, (_, _, first) in enumerate(self.buckets)
                                 if index not in self._pieces}
        # Under staging, the bucket whose slot the next layer down writes into.
        self._bucket_above = {first - 1: index + 1 for index, (_, _, first) in enumerate(self.buckets)}
        # Launched collectives, run one at a time in launch order: (schedule, bytes, bucket, kind),
        # kind "sum" (a gradient bucket) or "gather" (a parameter bucket, --zero).
        self._waiting: deque = deque()
        self._schedule, self._schedule_bytes, self._bucket, self._kind = None, 0, 0, "sum"
        self._pending = None
        self._gathered: set[int] = set()  # parameter buckets all-gathered since the last update
        # The bucket holding the end of each dense layer (forward order): gathered in forward order,
        # its completion means the whole layer's parameters are (a layer may span several pieces).
        # None for a layer with no parameters here (a tensor slice narrower than the group).
        self._bucket_holding = [next((index for index, (start, stop, _) in enumerate(self.buckets)
                                      if start < layer_stop <= stop), None) if layer_stop > layer_start else None
                                for layer_start, layer_stop in self.layer_slices]
        self._started, self._schedule_sent = 0.0, 0
        self._finished = 0  # buckets summed this step, in launch order
        # What the chosen algorithms really sent (see comm/traffic.py), cumulative.
        self.bytes_sent = 0

    # ------------------------------------------------------------------------ --zero 2: the shard alone

    def _stage(self, grads, mine: tuple[int, int]) -> None:
        """--zero 2, where zero2_buckets chose to stage: backward writes each bucket into one of two
        staging slots (even and odd buckets, so one bucket is summed while backward fills the
        next), and only this rank's shard of the sum is kept."""
        sizes = [stop - start for start, stop, _ in self.buckets]
        xp = np if isinstance(grads, np.ndarray) else __import__("cupy")
        self.slots = [xp.zeros(size, dtype=grads.dtype) for size in slot_sizes(sizes)]
        self.views = [self.slots[index % 2][:size] for index, size in enumerate(sizes)]
        self.shard_grads = xp.zeros(mine[1] - mine[0], dtype=grads.dtype)
        self._shard_start = mine[0]

    def layer_grads(self) -> list:
        """Where backward must write each dense layer's gradient, in forward order: a 1-D view, or for
        a layer cut into pieces, [(first row, stop row, 1-D view, bucket)] in launch order (rows of
        the weight; the bias is row `rows`, so the last piece's stop row is rows + 1)."""
        out = []
        for layer, (layer_start, layer_stop) in enumerate(self.layer_slices):
            pieces = [(start, stop, index) for index, (start, stop, owner) in enumerate(self.buckets)
                      if owner == layer and index in self._pieces]
            if pieces:
                row = self.row_sizes[layer]
                out.append([((start - layer_start) // row, (stop - layer_start) // row, self.views[index], index)
                            for start, stop, index in pieces])
                continue
            index, start = next((index, start) for index, (start, stop, _) in enumerate(self.buckets)
                                if start <= layer_start < stop)
            out.append(self.views[index][layer_start - start:layer_stop - start])
        return out

    def piece_started(self, bucket: int) -> None:
        """Backward is about to write piece `bucket` of a layer: its staging slot must be free."""
        self._free_slot_for(bucket)

    def piece_done(self, bucket: int) -> None:
        """Backward wrote piece `bucket`: launch its reduce-scatter and progress (as layer_done)."""
        if self.overlap:
            self._waiting.append((self._sum_schedule(bucket), self.views[bucket].nbytes, bucket, "sum"))
            self._advance(block=False)

    def nbytes(self) -> int:
        """Gradient bytes this rank keeps: the whole buffer, or the slots and the shard."""
        if self.staged:
            return sum(slot.nbytes for slot in self.slots) + self.shard_grads.nbytes
        return sum(view.nbytes for view in self.views)

    def _summed(self, bucket: int) -> None:
        """Bucket `bucket` holds its sum: keep this rank's part of it (staging), so its slot is free."""
        self._finished += 1
        if self.staged:
            start = self.buckets[bucket][0]
            a, b = self.bucket_chunks[bucket][self.comm.rank]
            offset = start + a - self._shard_start
            self.shard_grads[offset:offset + b - a] = self.views[bucket][a:b]

    def _free_slot_for(self, bucket: int) -> None:
        """Before backward writes bucket `bucket`: the bucket that last used its slot is summed."""
        if bucket < 2 or self._finished >= bucket - 1:
            return
        if self.overlap:
            self._advance(block=True, through=bucket - 2)
        else:
            self._run_blocking(bucket - 2)

    # ------------------------------------------------------------------------ every step

    def _sum_schedule(self, bucket: int):
        """The schedule that sums bucket `bucket`: an all-reduce, or the reduce-scatter onto its owners."""
        view = self.views[bucket]
        if self.compressed is not None:
            chunks = chunk_bounds(view.size, self.comm.size) if self.shards is None else self.bucket_chunks[bucket]
            # The offset in the flat buffer, not the view (a --zero 2 staging slot): the residual follows the entries.
            return self.compressed.schedule(view, self.comm, chunks, gather=self.shards is None,
                                            offset=self.buckets[bucket][0])
        if self.shards is None:
            return allreduce_schedule(view, self.comm, self.algorithm)
        return shard_reduce_schedule(view, self.comm, self.algorithm, self.bucket_chunks[bucket])

    def gather(self, params) -> None:
        """Sharded only: every rank's params[shards[q]] <- rank q's, after each owner updated its shard;
        bucket by bucket in forward order, so the first layers are whole first. Collective."""
        self.start_gather(params)
        self.finish_gather()

    def start_gather(self, params) -> None:
        """Sharded only: launch `gather` without waiting for it, progressed as far as it goes now, so
        the next step's forward can start on its first layers while the parameters of later ones
        are still on the way (ZeRO's all-gather overlapped with forward). Before dense layer i runs,
        `parameters_ready(i)`; before anything else reads the parameters, `finish_gather()`.
        Collective (every rank launches the same buckets in the same order)."""
        self._gathered.clear()
        for bucket in reversed(range(len(self.buckets))):
            start, stop, _ = self.buckets[bucket]
            view = params[start:stop]
            self._waiting.append((shard_gather_schedule(view, self.comm, self.algorithm, self.bucket_chunks[bucket]),
                                  view.nbytes, bucket, "gather"))
        self._advance(block=False)

    def parameters_ready(self, dense_index: int) -> None:
        """Wait until the parameters of dense layer `dense_index` are gathered (nothing to wait for
        when no gather runs), and progress the later buckets' gathers without waiting."""
        bucket = self._bucket_holding[dense_index]
        if bucket is not None and (self._waiting or self._pending is not None):
            self._advance(block=True, done=lambda: bucket in self._gathered)
            self._advance(block=False)

    def finish_gather(self) -> None:
        """Finish every launched parameter all-gather (nothing when none runs)."""
        self._advance(block=True)

    def layer_done(self, dense_index: int) -> None:
        """Backward has finished dense layer `dense_index`: launch its bucket if complete, progress."""
        if self.overlap:
            bucket = self._bucket_of_layer.get(dense_index)
            if bucket is not None:
                self._waiting.append((self._sum_schedule(bucket), self.views[bucket].nbytes, bucket, "sum"))
            self._advance(block=False)
        if self.staged and dense_index - 1 in self._bucket_above:
            self._free_slot_for(self._bucket_above[dense_index - 1])

    def wait(self) -> None:
        """Finish every bucket's sum (all of them, when overlap is off)."""
        if TRACE.active:
            started = TRACE.now()
        if not self.overlap:
            self._run_blocking(len(self.buckets) - 1)
        else:
            self._advance(block=True)
        self._finished = 0
        if TRACE.active:
            TRACE.span("wait", "gradient buckets", started)

    def _run_blocking(self, through: int) -> None:
        """Without overlap: sum the buckets not yet summed this step, up to `through`, one after another."""
        for bucket in range(self._finished, through + 1):
            view = self.views[bucket]
            before, begun = traffic.sent(), TRACE.now() if TRACE.active else 0.0
            complete(self._sum_schedule(bucket), f"gradient bucket sum, {view.nbytes} B")
            self.bytes_sent += traffic.sent() - before
            if TRACE.active:
                self._trace_bucket(view.nbytes, begun, traffic.sent() - before)
            self._summed(bucket)

    def _trace_bucket(self, nbytes: int, started: float, sent: int) -> None:
        """One bucket's sum on the trace (its all-reduce, or its reduce-scatter under --zero), from its
        first message to its last (bytes: what it sent)."""
        from mpitrain.comm.ring import SEGMENT_BYTES

        # auto's choice is cached by now: no message. A compressed sum is its own exchange.
        algorithm = "compressed" if self.compressed is not None else \
            resolve(self.algorithm, nbytes, self.comm, self.shards is not None)
        what = "reduce-scatter" if self.shards is not None else "all-reduce"
        TRACE.span("gradient all-reduce", f"{what} {nbytes} B ({algorithm})", started, algorithm=algorithm,
                   bucket_bytes=nbytes, bytes=sent, segments=-(-nbytes // self.comm.size // SEGMENT_BYTES) or 1)

    def _advance(self, block: bool, through: int | None = None, done=None) -> None:
        """Run launched collectives in order; unless block, stop at the first request still in
        flight; with `through`, stop once that gradient bucket is summed; with `done`, once done()."""
        if through is not None:
            done = lambda: self._finished > through  # noqa: E731
        while (self._pending is not None or self._waiting) and (done is None or not done()):
            if self._pending is None:
                self._schedule, self._schedule_bytes, self._bucket, self._kind = self._waiting.popleft()
            elif block:
                what = "all-reduce of a {} B gradient" if self._kind == "sum" else "all-gather of a {} B parameter"
                with waiting(f"Waitall ({self.algorithm} {what.format(self._schedule_bytes)} bucket "
                             f"over {self.comm.size} ranks)"):
                    MPI.Request.Waitall(self._pending)
            elif not MPI.Request.Testall(self._pending):
                return
            if self._pending is None and TRACE.active:
                self._started, self._schedule_sent = TRACE.now(), 0
            before = traffic.sent()
            self._pending = next(self._schedule, None)
            self.bytes_sent += traffic.sent() - before
            if TRACE.active:
                self._schedule_sent += traffic.sent() - before
                if self._pending is None and self._kind == "sum":
                    self._trace_bucket(self._schedule_bytes, self._started, self._schedule_sent)
                elif self._pending is None:
                    TRACE.span("parameter all-gather", f"all-gather {self._schedule_bytes} B", self._started,
                               bucket_bytes=self._schedule_bytes, bytes=self._schedule_sent)
            if self._pending is None and self._kind == "sum":
                self._summed(self._bucket)
            elif self._pending is None:
                self._gathered.add(self._bucket)
