"""Checkpoints, resume, preemption, the NaN policy, the watchdog and the start-up check of one run.

The training loop calls these hooks, and nothing else of this module:

    guard = Resilience(config, comm)       # compares configs across ranks; watchdog; signal flags
    comm = guard.comm                      # comm, watched when --comm-timeout is given
    start = guard.start(...)               # compares model and dataset shapes; --resume
    if guard.keep_step(loss, grads): ...   # after the gradient all-reduce: NaN/Inf and signals agreed
    guard.boundary(step, epoch, position)  # after each step and epoch: periodic checkpoint, preemption
    guard.finish(step, epoch, position)    # final checkpoint
    guard.tracker                          # best validation, plateau, patience (tracking.py): checkpointed
    guard.close()                          # watchdog stopped, signal handlers restored

A resumed run equals an uninterrupted one bit for bit on the same layout and world size: the
checkpoint holds the parameters, the optimizer's buffers and step counter, and the position in
the data (epoch and batches taken, the order itself being a pure function of seed, epoch and
rank), and everything after is the same arithmetic. (The parameter server repeats a run only in
sync mode with --staleness 0; see parallel/ps_train.py. Under --error-feedback on more than one
data-parallel rank the checkpoint holds the residual's sum over the ranks, not each one's share,
so the resumed run rounds differently: the same run to the wire dtype's rounding.)
"""

import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from mpitrain import __version__
from mpitrain.backend import read_scalar, step_finite
from mpitrain.checkpoint import (
    rng_arrays,
    rng_state,
    set_rng_state,
    Checkpoint,
    CorruptCheckpoint,
    buffer_prefix,
    checkpoint_name,
    expected_datasets,
    holds_residual,
    newest_valid_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from mpitrain.comm.consistency import check_consistent
from mpitrain.comm.failure import agree
from mpitrain.comm.watchdog import Watchdog, watch
from mpitrain.config import TrainConfig, as_dict
from mpitrain.errors import MpitrainError
from mpitrain.h5 import open_read
from mpitrain.nn.model import full_shapes, parse_widths
from mpitrain.outputs import write_error
from mpitrain.parallel.state import gather_pieces, load_pieces
from mpitrain.preempt import Preempted, PreemptionFlag
from mpitrain.tracking import Tracker

# Fields that may differ between ranks (per-node core counts, rank 0's progress bar).
RANK_LOCAL_FIELDS = ("threads", "progress")
# Fields that do not change the arithmetic of a run: a resume that changes only these repeats the
# uninterrupted run.
NON_TRAJECTORY_FIELDS = RANK_LOCAL_FIELDS + ("metrics", "save", "device", "checkpoint_dir", "checkpoint_every",
                                             "keep_checkpoints", "resume", "comm_timeout", "on_nan", "max_memory",
                                             "check_collectives", "trace", "trace_steps", "log_every", "tensorboard",
                                             "save_best")


@dataclass
class Position:
    """Where a run stands: optimizer steps done, current epoch, batches of that epoch already taken."""

    step: int = 0
    epoch: int = 0
    position: int = 0


class Resilience:
    """The fault-tolerance side of one training run on the ranks of comm. Construction is collective."""

    def __init__(self, config: TrainConfig, comm: MPI.Intracomm):
        fields = {name: value for name, value in as_dict(config).items() if name not in RANK_LOCAL_FIELDS}
        check_consistent(comm, fields, "configuration")
        self.config = config
        self.watchdog = Watchdog(config.comm_timeout, comm.rank) if config.comm_timeout else None
        self.comm = watch(comm, self.watchdog) if self.watchdog else comm
        self.flag = PreemptionFlag(checkpoints=config.checkpoint_dir is not None)
        self.tracker = Tracker(config)
        self.started = time.perf_counter()
        # The --data the run was given: the synthetic set's cache path, filled in later, is not a setting.
        self.data_given = config.data
        self.skipped = 0
        self.stop_reason: str | None = None
        self.say = self.warn = lambda line: None
        self._flags = np.zeros(3, dtype=np.int64)
        # The current epoch's loss sum (this rank's) and kept steps: the loop adds to them, a
        # checkpoint carries them, so a resumed epoch reports what the uninterrupted one does.
        self.epoch_sums = {"loss_sum": 0.0, "kept_steps": 0}
        self._written: tuple[int, str] | None = None
        self._step = 0

    # ------------------------------------------------------------------------ start and resume

    def start(self, strategy, dataset_fields: dict, steps_per_epoch: int, total_steps: int, say) -> Position:
        """Check that every rank built the same model and sees the same dataset, then resume if asked.
        Collective. `strategy` is the layout's (parallel/strategy.py); `say` prints a line (rank 0's
        reporter)."""
        self.strategy = strategy
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        if self.comm.rank == 0:
            self.say = say
            self.warn = lambda line: print(f"mpitrain: warning: {line}", file=sys.stderr, flush=True)
        check_consistent(self.comm, {"model": self.config.model, "dtype": self.config.dtype,
                                     "dataset shape": dataset_fields,
                                     "steps per epoch": steps_per_epoch}, "start-up")
        position = self._resume() if self.config.resume else Position()
        self.set_step(position.step)
        return position

    def _resume(self) -> Position:
        comm, found, error = self.comm, None, None
        if comm.rank == 0:
            try:
                found = self._find_checkpoint()
                if found is not None:
                    self._warn_changes(*found[:2])
            except MpitrainError as exc:
                error = exc
        agree(comm, error)
        header = comm.bcast(found[:2] if found is not None else None, root=0)
        if header is None:
            self.say(f"mpitrain: no checkpoint in {self.config.checkpoint_dir}: starting at step 0")
            return Position()
        path, meta = header
        error = None
        try:
            position = self._restore(path, meta)
            self._restore_epoch_sums(path, meta, position)
            self.tracker.load_state(meta.get("tracking"), path)
        except MpitrainError as exc:
            error, position = exc, None
        except OSError as exc:
            error, position = MpitrainError(f"{path}: reading the checkpoint failed ({exc})"), None
        agree(comm, error)
        self.say(f"mpitrain: resumed from {path} (step {position.step}, epoch {position.epoch + 1})")
        return position

    def _find_checkpoint(self) -> tuple[str, dict, dict] | None:
        if self.config.resume == "auto":
            return newest_valid_checkpoint(self.config.checkpoint_dir, self.warn, self._expected)
        return (self.config.resume, *verify_checkpoint(self.config.resume, self._expected))

    def _expected(self, path: str, meta: dict) -> dict:
        """The datasets a checkpoint of this run holds, after checking its metadata (verify_checkpoint
        calls this before reading any data): a file holding anything else is corrupt."""
        self._check_compatible(path, meta)
        shapes = full_shapes(parse_widths(self.config.model))
        return expected_datasets(shapes, self.strategy.optimizer.buffers, meta["world_size"],
                                 holds_residual(meta, path))

    def _check_compatible(self, path: str, meta: dict) -> None:
        """Refuse a checkpoint this run cannot load: another model or optimizer, or a field out of
        range. A digest proves the file is what was written, not that what was written is sane."""
        step, epoch, position = (_field(meta, name, int, path, low=0) for name in ("step", "epoch", "position"))
        _field(meta, "world_size", int, path, low=1)
        _field(meta, "skipped_steps", int, path, low=0, high=step)
        steps_per_epoch = _field(meta, "steps_per_epoch", int, path, low=1)
        if position >= steps_per_epoch:
            raise MpitrainError(f"{path}: checkpoint field 'position' = {position}: must be below its epoch's "
                                f"{steps_per_epoch} steps ('steps_per_epoch')")
        optimizer = _field(meta, "optimizer", dict, path)
        _field(optimizer, "t", int, path, low=0, name="optimizer step 't'")
        model = _field(meta, "model", dict, path)
        saved_widths = _field(model, "widths", str, path)
        if saved_widths != self.config.model:
            raise MpitrainError(f"{path}: checkpoint is for --model {saved_widths} but this run builds "
                                f"--model {self.config.model}")
        kind = _field(optimizer, "kind", str, path)
        if kind != self.config.optimizer:
            raise MpitrainError(f"{path}: checkpoint holds {kind} state but this run uses "
                                f"--optimizer {self.config.optimizer}")
        _field(meta, "config", dict, path)

    def _warn_changes(self, path: str, meta: dict) -> None:
        """Name every setting that differs from the checkpoint's (old -> new), and say whether the
        run will still repeat an uninterrupted one (only settings of NON_TRAJECTORY_FIELDS changed)."""
        saved, now = meta["config"], {**as_dict(self.config), "data": self.data_given}
        differ = [name for name, value in now.items()
                  if name not in RANK_LOCAL_FIELDS + ("resume",) and name in saved and saved[name] != value]
        changed = [f"{name} {saved[name]!r} -> {now[name]!r}" for name in differ]
        if meta["world_size"] != self.comm.size:
            changed.append(f"world size {meta['world_size']} -> {self.comm.size}")
        if not changed:
            return
        repeats = meta["world_size"] == self.comm.size and all(name in NON_TRAJECTORY_FIELDS for name in differ)
        self.warn(f"{path}: resuming with {', '.join(changed)}: "
                  + ("the training itself is unchanged" if repeats else "the run will not repeat an uninterrupted one"))

    def _restore(self, path: str, meta: dict) -> Position:
        """Every rank reads its own pieces (parameters, optimizer state, the summed residual of
        --error-feedback) and, on the same world size, its RNG row. Raises MpitrainError or
        OSError; the caller agrees."""
        strategy = self.strategy
        residual = strategy.residual_buffer() if holds_residual(meta, path) else None
        buffers = ["param", *strategy.optimizer.buffers, *(["residual"] if residual is not None else [])]
        with open_read(path, error=CorruptCheckpoint) as handle:
            load_pieces(strategy.pieces(residual), handle, {buffer: buffer_prefix(buffer) for buffer in buffers})
            rng = {name: handle[name][()] for name in rng_arrays([rng_state()])}
        if residual is not None:
            strategy.set_residual(residual)
        elif holds_residual(meta, path):
            self.warn(f"{path}: the checkpoint holds an --error-feedback residual but this run has no "
                      "--error-feedback: the residual is dropped")
        strategy.optimizer.t = meta["optimizer"]["t"]
        if meta["world_size"] == self.comm.size:
            try:
                set_rng_state(rng, self.comm.rank)
            except (ValueError, TypeError, OverflowError) as exc:
                raise MpitrainError(f"{path}: checkpoint field 'rng/...' of rank {self.comm.rank} is not a "
                                    f"generator state ({exc})") from None
        self.skipped = meta["skipped_steps"]
        position = Position(meta["step"], meta["epoch"], meta["position"])
        if meta["steps_per_epoch"] != self.steps_per_epoch and position.position:
            self.warn(f"epochs now have {self.steps_per_epoch} steps, {meta.get('steps_per_epoch')} when saved: "
                      f"continuing at the start of epoch {position.epoch + 2}")
            position = Position(position.step, position.epoch + 1, 0)
        return position

    def _restore_epoch_sums(self, path: str, meta: dict, position: Position) -> None:
        """This rank's loss sum of the saved partial epoch (all of it on rank 0 when the world size
        changed); nothing at an epoch's start or from a checkpoint written before sums were saved."""
        saved = meta.get("partial_epoch") if position.position else None
        if saved is None:
            return
        sums, kept = (saved.get("loss_sums"), saved.get("kept_steps")) if isinstance(saved, dict) else (None, None)
        if (not isinstance(sums, list) or len(sums) != meta["world_size"] or not isinstance(kept, int)
                or not 0 <= kept <= position.position
                or not all(isinstance(v, float) and math.isfinite(v) for v in sums)):
            raise MpitrainError(f"{path}: checkpoint metadata 'partial_epoch' is malformed")
        mine = sums[self.comm.rank] if len(sums) == self.comm.size else (sum(sums) if self.comm.rank == 0 else 0.0)
        self.epoch_sums = {"loss_sum": mine, "kept_steps": kept}

    # ------------------------------------------------------------------------ every step

    def keep_step(self, loss_value: float, grads, bad_input: str | None = None) -> bool:
        """Whether to apply this step's update, the same answer on every rank. Collective.

        Call after the gradient sum, with `grads` this rank's block of it (the blocks of all ranks
        cover every gradient element at least once): the flags of every rank (a non-finite input row read this
        step, a non-finite loss or gradient here, a signal received) are combined in one small
        all-reduce, so a NaN on one rank and a signal on another are acted on by all ranks at the
        same step. A bad input row stops the run on every rank with the message naming its file
        and row (MpitrainError): it is a fault of the data, which no policy should train through.
        """
        nonfinite = not step_finite(loss_value, grads)
        signum = self.flag.signum if self.flag is not None else 0
        self._flags[0], self._flags[1], self._flags[2] = nonfinite, signum, bad_input is not None
        if self.comm.size > 1:
            self.comm.Allreduce(MPI.IN_PLACE, self._flags, op=MPI.MAX)
        if self._flags[2]:
            messages = [m for m in (self.comm.allgather(bad_input) if self.comm.size > 1 else [bad_input]) if m]
            raise MpitrainError(messages[0])
        if self._flags[1] and self.stop_reason is None:
            self.stop_reason = signal_reason(self.comm, signum)
        if not self._flags[0]:
            return True
        bad_loss = [rank for rank, bad in enumerate(self.comm.allgather(not math.isfinite(read_scalar(loss_value)))) if bad]
        where = f"loss on rank(s) {_compact(bad_loss)}" if bad_loss else "all-reduced gradient"
        if self.config.on_nan == "abort":
            raise MpitrainError(f"step {self._step + 1}: NaN or Inf in the {where}; "
                                "--on-nan skip would drop such steps instead")
        self.skipped += 1
        self.warn(f"step {self._step + 1}: NaN or Inf in the {where}: update skipped on every rank "
                  f"({self.skipped} skipped so far)")
        return False

    def boundary(self, step: int, epoch: int, position: int) -> None:
        """After a step (or an epoch's evaluation): write the periodic checkpoint, or the checkpoint
        of an agreed stop and raise Preempted on every rank. Collective.

        The last step of an epoch waits for the call after the epoch's evaluation (position 0 of
        the next epoch), so a resumed run never repeats or skips an epoch record.
        """
        self.set_step(step)
        if position == self.steps_per_epoch or step >= self.total_steps:
            return
        if self.stop_reason is not None:
            self.stop(Position(step, epoch, position), self.stop_reason)
        every = self.config.checkpoint_every
        if every and step % every == 0:
            self.write(Position(step, epoch, position))

    def stop(self, position: Position, reason: str) -> None:
        """The agreed stop of a signal: write the checkpoint of `position` when checkpointing, then
        raise Preempted on every rank. Collective."""
        path = self.write(position) if self.config.checkpoint_dir else None
        raise Preempted(position.step, path, reason)

    def elapsed(self) -> float:
        """Seconds of this run, those before the checkpoint it resumed from included."""
        return self.tracker.elapsed_before + time.perf_counter() - self.started

    @property
    def last_checkpoint(self) -> str | None:
        return self._written[1] if self._written else None

    def finish(self, step: int, epoch: int, position: int) -> None:
        """Write the final checkpoint (if checkpointing), so `--resume auto` of a finished run is a no-op."""
        if self.config.checkpoint_dir:
            self.write(Position(step, epoch, position))

    def close(self) -> None:
        """Stop the watchdog and restore the signal handlers; safe to call more than once."""
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.flag is not None:
            self.flag.restore()
            self.flag = None

    def metrics(self) -> dict:
        return {"skipped_steps": self.skipped}

    def set_step(self, step: int) -> None:
        """The step the watchdog names in its report (the next one to run)."""
        self._step = step
        if self.watchdog is not None:
            self.watchdog.step = step + 1

    # ------------------------------------------------------------------------ writing

    def signalled(self) -> bool:
        """Whether this rank received SIGINT, or SIGUSR1/SIGTERM (only watched with --checkpoint-dir)."""
        return bool(self.flag is not None and self.flag.signum)

    def write(self, position: Position) -> str:
        """Rank 0 writes the checkpoint of `position`: the pieces of one copy of the model and its
        optimizer state laid into unsliced arrays, the RNG states of every rank; then keeps the newest
        --keep-checkpoints. Every rank learns whether it worked. Collective."""
        if self._written is not None and self._written[0] == position.step:
            return self._written[1]
        folder = self.config.checkpoint_dir
        path = os.path.join(folder, checkpoint_name(position.step))
        started = time.perf_counter()
        strategy, widths = self.strategy, parse_widths(self.config.model)
        residual = strategy.residual_sum()  # collective on each data-parallel group; None without --error-feedback
        buffers = ["param", *strategy.optimizer.buffers, *(["residual"] if residual is not None else [])]
        full = gather_pieces(strategy.pieces(residual), buffers, strategy.holds_copy, widths,
                             np.dtype(self.config.dtype), self.comm)
        t = strategy.optimizer_t()
        rng_states = self.comm.gather(rng_state(), root=0)
        loss_sums = self.comm.gather(read_scalar(self.epoch_sums["loss_sum"]), root=0)
        error = None
        if self.comm.rank == 0:
            try:
                os.makedirs(folder, exist_ok=True)
                save_checkpoint(path, self._snapshot(position, full, rng_states, t, loss_sums))
                prune_checkpoints(folder, self.config.keep_checkpoints, path)
            except MpitrainError as exc:
                error = exc
            except (OSError, ValueError) as exc:
                error = write_error(path, exc)
            if error is None:
                size = os.path.getsize(path) / 1e6
                self.say(f"checkpoint: step {position.step} -> {path} ({size:.1f} MB in "
                         f"{time.perf_counter() - started:.2f} s)")
        agree(self.comm, error)
        self._written = (position.step, path)
        return path

    def _snapshot(self, position: Position, full: dict, rng_states: list, t: int, loss_sums: list) -> Checkpoint:
        arrays = {buffer_prefix(buffer) + name: value
                  for buffer, named in full.items() for name, value in named.items()}
        arrays.update(rng_arrays(rng_states))
        config = self.config
        meta = {
            "step": position.step,
            "epoch": position.epoch,
            "position": position.position,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.comm.size,
            "layout": self.strategy.layout_metrics(),
            "skipped_steps": self.skipped,
            "partial_epoch": {"loss_sums": loss_sums, "kept_steps": self.epoch_sums["kept_steps"]},
            "model": {"widths": config.model, "activation": config.activation, "dtype": config.dtype},
            "optimizer": {"kind": config.optimizer, "t": int(t)},
            "residual": "residual" in full,
            "sampler": {"kind": config.sampler, "partition": config.partition, "seed": config.seed,
                        "order": "permutation seeded by (seed, epoch[, rank]); `position` batches taken"},
            "config": {**as_dict(config), "data": self.data_given},
            "tracking": self.tracker.state(self.elapsed()),
            "mpitrain": __version__,
        }
        return Checkpoint(meta, arrays)


# ---------------------------------------------------------------------------- helpers


def signal_reason(comm: MPI.Intracomm, signum: int) -> str:
    """'SIGUSR1 on rank(s) 0, 3': the signals this job's ranks received. Collective on comm."""
    received = comm.allgather(signum)
    ranks = [rank for rank, got in enumerate(received) if got]
    names = sorted({signal.Signals(got).name for got in received if got})
    return f"{'/'.join(names)} on rank(s) {_compact(ranks)}"


def dataset_shape(dataset) -> dict:
    """The fields of a dataset every rank must agree on at start-up."""
    return {"rows": dataset.n_rows, "features": dataset.n_features, "x dtype": str(dataset.x_dtype),
            "y dtype": str(dataset.y_dtype), "y width": dataset.y_width}


def _field(mapping: dict, key: str, kind: type, path: str, low=None, high=None, name: str | None = None):
    """mapping[key], which must be a `kind` in [low, high]: checkpoint metadata is checked, never
    trusted. `name` is how messages call it (default 'key')."""
    name = name or f"'{key}'"
    value = mapping.get(key) if isinstance(mapping, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MpitrainError(f"{path}: checkpoint field {name} is missing or not a {kind.__name__}")
    if low is not None and value < low:
        raise MpitrainError(f"{path}: checkpoint field {name} = {value}: must be {low} or more")
    if high is not None and value > high:
        raise MpitrainError(f"{path}: checkpoint field {name} = {value}: must be at most {high}")
    return value


def _compact(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks[:8])) + (", ..." if len(ranks) > 8 else "")
