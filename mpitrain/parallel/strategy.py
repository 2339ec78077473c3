"""The layout's part of a training step, chosen once from the flags; the loop never asks which.

    strategy = GridStrategy(config, comm, widths, backend)   # dp x tp x pp; data parallel is tp = pp = 1
    loss_sum = strategy.forward_backward(x, y)              # schedule, and the bucketed gradient sum
    strategy.update(lr)                                     # optimizer step on this rank's shards

Data parallelism is the grid with one tensor rank and one stage: the same model class, the same
Stage, the same GradientSync (buckets of whole layers, last first, overlapped with backward) over
the data-parallel group. The parameter server's workers (parallel/ps_train.py) reuse the Stage and
send their gradients to the servers instead of summing them.
"""

import numpy as np
from mpi4py import MPI

from mpitrain.comm.buckets import GradientSync
from mpitrain.comm.compress import CompressedSum, wire_dtype
from mpitrain.comm.ring import chunk_bounds
from mpitrain.config import TrainConfig
from mpitrain.nn.losses import make_loss
from mpitrain.nn.model import Model
from mpitrain.optim import make_optimizer
from mpitrain.parallel.grid import make_grid, plan_layout
from mpitrain.parallel.mappings import TensorGroup
from mpitrain.parallel.pipeline import StageLink, bubble_fraction
from mpitrain.parallel.pipeline import schedule as pipeline_schedule
from mpitrain.parallel.stage import Stage
from mpitrain.parallel.state import range_pieces


class GridStrategy:
    """Data x pipeline x tensor parallelism over comm. Construction is collective on comm and
    raises MpitrainError on every rank alike, before any message, when the layout does not fit."""

    def __init__(self, config: TrainConfig, comm: MPI.Intracomm, widths: list[int], backend):
        self.config, self.comm, self.widths = config, comm, widths
        self.layout = layout = plan_layout(config, comm.size, widths)
        self.grid = grid = make_grid(comm, layout)
        xp = backend.xp
        self.model = Model(widths, config.activation, xp, config.dtype, config.seed,
                           group=TensorGroup(grid.tp_comm, xp), layers=layout.stages[grid.pp_rank],
                           micro_batches=layout.micro_batches)
        self.link = StageLink(grid.pp_comm, xp)
        actions = pipeline_schedule(layout.schedule, layout.pp, grid.pp_rank, layout.micro_batches)
        self.stage = Stage(self.model, self.link, make_loss(config.loss, xp), actions, layout.micro_batches,
                           grid.first_stage, grid.last_stage)
        # --zero 1, 2 (ZeRO, Rajbhandari et al. 2020): data-parallel rank q owns the equal block
        # shards[q] of the flat buffers, sums only that block's gradients (a reduce-scatter), updates
        # only that block with optimizer state for it alone, and all-gathers the parameters after.
        params, grads = self.model.params, self.model.grads
        self.zero = config.zero
        shards = chunk_bounds(params.size, grid.dp_comm.size) if self.zero else None
        self.shard = shards[grid.dp_comm.rank] if self.zero else (0, params.size)
        start, stop = self.shard
        self.compressed = None
        if config.grad_dtype is not None and wire_dtype(config.grad_dtype).itemsize < params.itemsize:
            self.compressed = CompressedSum(wire_dtype(config.grad_dtype), config.error_feedback, params.size)
        self.grad_sync = GradientSync(grads, self.model.layer_grad_slices(), grid.dp_comm, config.allreduce,
                                      config.bucket_mb, config.overlap, shards, self.compressed, config.zero == 2,
                                      [layer.weight_shape[1] for layer in self.model.dense])
        if self.grad_sync.staged:  # --zero 2: backward writes into the sync's slots; the whole buffer goes
            self.model.bind_grads(self.grad_sync.layer_grads(), self.grad_sync.piece_started,
                                  self.grad_sync.piece_done)
        self.optimizer = make_optimizer(config, params[start:stop], self.grad_sync.shard_grads)
        self.scale = 1.0 / config.batch_size
        # The communicator the rows are split over, and which ranks speak for the whole model.
        self.data_comm = grid.dp_comm
        self.reports_loss = grid.last_stage and grid.tp_rank == 0
        self.holds_copy = grid.dp_rank == 0 or bool(self.zero)  # sharded: every rank holds a disjoint part

    def describe(self) -> str:
        text = f"layout: {self.layout.describe()}"
        if self.zero == 2 and not self.grad_sync.staged and self.grid.dp_comm.size > 1:
            where = " on the first stage" if self.layout.pp > 1 else ""
            text += (f"; --zero 2 keeps the whole gradient buffer{where}: two staging buckets and the shard would be no "
                     f"smaller (buckets of {self.config.bucket_mb:g} MiB against a {self.model.params.nbytes / 2**20:.1f} "
                     "MiB model: a smaller --bucket-mb stages)")
        return text

    def forward_backward(self, x, y) -> float:
        """One step's forward and backward, gradients summed over the data-parallel group; returns
        this rank's loss sum (0 except on one rank per tensor group of the last stage)."""
        before_layer = self.grad_sync.parameters_ready if self.zero else None
        loss_sum = self.stage.forward_backward(x, y, self.scale, self.grad_sync.layer_done, before_layer)
        self.grad_sync.wait()
        return loss_sum if self.reports_loss else 0.0

    @property
    def grads_to_check(self):
        """This rank's block of the summed gradient for the NaN/Inf check: under --zero the shard it
        holds; else its 1/dp block of the flat gradient (after the sum every rank of a
        data-parallel group holds the same gradient, so each reads only its block and the
        agreement's MAX over the world covers the whole)."""
        if self.config.zero:
            return self.grad_sync.shard_grads
        start, stop = chunk_bounds(self.model.grads.size, self.grid.dp_comm.size)[self.grid.dp_comm.rank]
        return self.model.grads[start:stop]

    def update(self, lr: float, keep: bool = True) -> None:
        """Apply the summed gradient (keep=False: the agreed NaN policy drops this step); under
        --zero each rank updates its shard and the parameters' all-gather starts, to be finished
        by the next forward layer by layer (or by whatever reads the parameters first). Collective."""
        if keep:
            self.optimizer.step(lr)
            if self.zero:
                self.grad_sync.start_gather(self.model.params)

    def share_parameters(self) -> None:
        """After a checkpoint or --init-from was read (each rank reads only its pieces): under --zero,
        all-gather the parameter shards so every rank holds its whole model again. Collective."""
        if self.zero:
            self.grad_sync.gather(self.model.params)

    def evaluate(self, x, y) -> np.ndarray:
        """(loss sum, correct, rows) over every data-parallel group's validation rows. Collective."""
        self.grad_sync.finish_gather()
        totals = self.stage.evaluate(x, y, self.reports_loss)
        self.comm.Allreduce(MPI.IN_PLACE, totals, op=MPI.SUM)
        return totals

    # ------------------------------------------------------------------------ state and metrics

    def pieces(self, residual: np.ndarray | None = None) -> list[tuple[str, tuple, dict]]:
        """(parameter name, index into the unsliced parameter, {'param': view, optimizer buffer
        name: view}) for every shard this rank holds: what a checkpoint saves and restores. With
        `residual` (residual_sum or residual_buffer: one entry per entry of this rank's shard) its
        views too, as buffer 'residual'. Collective under --zero (a parameter all-gather still in
        flight is finished first)."""
        self.grad_sync.finish_gather()
        state = {**self.optimizer.buffers, **({"residual": residual} if residual is not None else {})}
        start, stop = self.shard
        if self.zero:
            return range_pieces(self.model.shards(), self.widths, start, stop, self.model.params, state)
        out = []
        for name, index, view, (first, last) in self.model.shards():
            views = {"param": view}
            for buffer, flat in state.items():
                views[buffer] = flat[first:last].reshape(view.shape)
            out.append((name, index, views))
        return out

    # The --error-feedback residual is each data-parallel rank's; what the next steps need is its sum
    # over the group (the summed gradient carries every rank's), so a checkpoint holds that sum, as
    # one more unsliced buffer: any world size, layout or --zero stage can read it.

    def _residual_owners(self) -> list[tuple[int, int]]:
        """[start, stop) of the flat buffer whose summed residual each data-parallel rank holds: its
        shard under --zero, else all of it on rank 0 (the rank whose pieces a checkpoint takes)."""
        if self.zero:
            return self.grad_sync.shards
        size, dp = self.model.params.size, self.grid.dp_comm.size
        return [(0, size)] + [(size, size)] * (dp - 1)

    def residual_sum(self) -> np.ndarray | None:
        """This rank's shard of the error-feedback residual summed over its data-parallel group, for
        pieces() (host array, one entry per shard entry, in the parameters' dtype; zeros where this
        rank holds no copy), or None without --error-feedback. Collective on the data-parallel
        group (every rank of comm calls it: each group sums its own)."""
        if self.compressed is None or not self.compressed.error_feedback:
            return None
        self.grad_sync.finish_gather()  # no parameter all-gather left in flight beside these messages
        summed = self.compressed.residual_sum(self.grid.dp_comm, self._residual_owners(), self.model.params.dtype)
        start, stop = self.shard
        return summed if self.holds_copy else np.zeros(stop - start, summed.dtype)

    def residual_buffer(self) -> np.ndarray | None:
        """Zeros to read a checkpoint's summed residual into through pieces(residual=...), then to
        give to set_residual; None without --error-feedback. Local."""
        if self.compressed is None or not self.compressed.error_feedback:
            return None
        start, stop = self.shard
        return np.zeros(stop - start, self.model.params.dtype)

    def set_residual(self, summed: np.ndarray) -> None:
        """The summed residual read into residual_buffer()'s array becomes the residual of the rank that
        holds each entry (the one residual_sum gives it to), zero on the others: the group's sum is
        the saved one, bit for bit. Local."""
        self.compressed.set_residual(self.shard[0], summed if self.holds_copy else None)

    def optimizer_t(self) -> int:
        """The optimizer's step count (the same on every rank)."""
        return self.optimizer.t

    def counters(self) -> np.ndarray:
        """Cumulative bytes this rank sent: tensor-parallel exchanges, pipeline links, gradient sum
        (with the --zero parameter all-gather, finished first so that it counts in its own step)."""
        self.grad_sync.finish_gather()
        return np.array([self.model.group.bytes_sent, self.link.bytes_sent, self.grad_sync.bytes_sent], dtype=np.float64)

    def layout_metrics(self) -> dict:
        layout = self.layout
        return {"dp": layout.dp, "tp": layout.tp, "pp": layout.pp, "micro_batches": layout.micro_batches,
                "bubble_fraction": bubble_fraction(layout.pp, layout.micro_batches)}

    def memory(self) -> np.ndarray:
        """Bytes per rank: parameters, gradients (with --grad-dtype's wire copies and residuals),
        optimizer state (1/dp of it under --zero), peak activations kept."""
        optimizer = sum(b.nbytes for b in self.optimizer.buffers.values())
        grads = self.grad_sync.nbytes() + (self.compressed.nbytes() if self.compressed else 0)
        return np.array([self.model.params.nbytes, grads, optimizer, self.model.peak_bytes],
                        dtype=np.float64)

    def wait_seconds(self) -> float:
        return self.link.wait_s

    def close(self) -> None:
        self.grad_sync.finish_gather()
        self.grid.free()

