"""The training loop: one loop for every layout.

    mpitrain train                                      # one process
    mpirun -n 4 mpitrain train                          # data parallel, the same global batch of 128
    mpirun -n 4 mpitrain train --tp 2 --pp 2 --micro-batches 4 --checkpoint-dir ck --resume auto
    mpirun -n 4 mpitrain train --sync ps --ps-mode async

    from mpitrain import TrainConfig, train                # the same loop from Python
    result = train(TrainConfig(epochs=2), callbacks=[...])

Every step: this rank's batch (data/rank.py), the layout's forward and backward with its gradient
sum (a strategy chosen once from the flags, parallel/strategy.py: data x tensor x pipeline), the
agreed NaN/signal check, the update, and the boundary hooks (periodic checkpoint, preemption) of
resilience.py, and every --log-every steps a step record. After each epoch: validation, one
metrics record, and what watches the validation loss (tracking.py: --save-best, --schedule
plateau, --early-stop). The parameter server
(--sync ps) runs from parallel/ps_train.py: its workers use the same step code, data, checkpoint
writer and record fields, but agree through the servers instead of a per-step collective. Gradients are scaled by
1/global_batch, so the result is the global-batch mean whatever the world size and layout.
"""

import os
import sys
import time
import types

import numpy as np
from mpi4py import MPI

from mpitrain.backend import limit_blas_threads, read_scalar, select_backend
from mpitrain.callbacks import Callbacks
from mpitrain.comm import agree, fingerprint, world
from mpitrain.comm.thresholds import describe_source
from mpitrain.config import TrainConfig, validate
from mpitrain.data.rank import Batches, ensure_synthetic, load_rank_data, open_dataset
from mpitrain.errors import MpitrainError, error_of
from mpitrain.memory import check_memory
from mpitrain.nn.model import parse_widths
from mpitrain.optim import schedule
from mpitrain.preflight import check_outputs
from mpitrain.parallel import ps_train
from mpitrain.parallel.state import full_parameters, gather_pieces, init_from, save_model
from mpitrain.parallel.strategy import GridStrategy
from mpitrain.report import (Reporter, TrainResult, busiest_rank, summarize, validation_metrics,
                             written_files)
from mpitrain.resilience import Resilience, dataset_shape
from mpitrain.trace import TRACE, trace_path


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    return config.steps if config.steps is not None else config.epochs * steps_per_epoch


def train(config: TrainConfig, comm: MPI.Intracomm | None = None, callbacks=()) -> TrainResult:
    """Train under `config` on the ranks of `comm` (default: every rank of the job, through the
    library's clone of COMM_WORLD); every rank returns the same result: final parameters
    {name: unsliced array}, one record per epoch (history) and the summary. Collective.

    callbacks: objects with on_step_end(record) and/or on_epoch_end(record) (mpitrain.Callback),
    called on every rank with the same record; one returning True stops the run on every rank
    after that step, as a finished run (see mpitrain/callbacks.py).

    Raises MpitrainError on every rank for bad input or a layout that does not fit, and
    mpitrain.preempt.Preempted on every rank when a signal stopped the run (after writing the
    checkpoint of the agreed step when checkpointing).
    """
    validate(config)  # again: a dataclass can be changed after it was built
    comm = world() if comm is None else comm
    callbacks = Callbacks(callbacks)
    if callbacks and config.sync == "ps":
        raise MpitrainError("callbacks: --sync ps reports its epochs only at the end of the run; "
                            "use sync='allreduce'")
    if config.layout == "auto":
        from mpitrain.plan.auto import choose

        config, chosen = choose(config, comm)  # before anything is built from the layout flags
        if comm.rank == 0:
            print(chosen, flush=True)
    if config.check_collectives:
        fingerprint.enable()
    if trace_path(config):
        TRACE.start(trace_path(config), config.trace_steps, comm)
    guard = Resilience(config, comm)
    try:
        if config.sync == "ps":
            result = ps_train.run(config, guard)
        else:
            result = _loop(config, guard.comm, guard, GridStrategy, callbacks)
    except BaseException:
        TRACE.dump_local()  # the other ranks may not reach a gather: each keeps what it has
        raise
    finally:
        guard.close()
    TRACE.finish(comm)
    return result


def _loop(config: TrainConfig, comm: MPI.Intracomm, guard: Resilience, make_strategy,
          callbacks: Callbacks) -> TrainResult:
    """The loop on the ranks of comm, with the layout's strategy make_strategy(config, comm, widths,
    backend). Collective on comm."""
    check_outputs(config, comm)
    widths = parse_widths(config.model)
    check_memory(config, widths, comm)
    backend = select_backend(config.device, comm)
    threads = limit_blas_threads(comm, config.threads)
    strategy = make_strategy(config, comm, widths, backend)
    if config.data is None:
        config.data = ensure_synthetic(config, widths, comm)
    dataset = open_dataset(config, widths, comm)
    check_memory(config, widths, comm, dataset)
    data = load_rank_data(dataset, config, widths[-1], strategy.data_comm)
    batches = Batches(data, dataset, backend, config)
    val_x = backend.xp.asarray(data.val_x, dtype=np.dtype(config.dtype))
    val_y = backend.xp.asarray(data.val_y, dtype=batches.label_dtype)
    if config.init_from:
        init_from(config.init_from, strategy.pieces(), widths, comm)
    spe, tracker = data.steps_per_epoch, guard.tracker
    steps = total_steps(config, spe)
    schedule(config.schedule, config.lr, 0, steps, config.warmup_steps)  # a bad warm-up fails here, everywhere
    report = Reporter(config, comm.size, steps, comm.rank == 0)
    agree(comm, error_of(report.start, backend, threads, _allreduce_note(config, strategy.data_comm)))
    report.say(strategy.describe())
    start = guard.start(strategy, dataset_shape(dataset), spe, steps, report.say)
    strategy.share_parameters()
    agree(comm, error_of(report.continue_from, start.step))

    step, epoch, position = start.step, start.epoch, start.position
    looped, stopped, best_written = time.perf_counter(), tracker.stopped, False
    while step < steps and stopped is None:
        started, epoch_steps, sums = time.perf_counter(), 0, guard.epoch_sums
        counters, waited = strategy.counters(), strategy.wait_seconds()
        fetched = time.perf_counter()
        for x, y in batches.epoch(epoch, min(spe, position + steps - step), start=position):
            if TRACE.active:
                TRACE.set_step(step)
                begun = TRACE.now()
                TRACE.span("data", "batch", fetched, begun)
            step_loss = strategy.forward_backward(x, y)
            keep = guard.keep_step(step_loss, strategy.grads_to_check, batches.bad_input)
            if TRACE.active:
                updating = TRACE.now()
            lr = schedule(config.schedule, config.lr, step, steps, config.warmup_steps, **tracker.schedule_options(spe))
            strategy.update(lr, keep)
            if TRACE.active:
                TRACE.span("optimizer", "update", updating, kept=bool(keep))
            if keep:
                sums["loss_sum"] = sums["loss_sum"] + step_loss  # on the device; read once per epoch
                sums["kept_steps"] += 1
            step += 1
            position += 1
            epoch_steps += 1
            report.advance()
            logged = bool(config.log_every) and step % config.log_every == 0
            if logged or callbacks.per_step:
                record = _step_record(comm, config, step, step_loss, lr, time.perf_counter() - fetched, guard)
                if logged:
                    report.step(record)
                if callbacks.call("on_step_end", record, comm):
                    stopped = "stopped by a callback"
            if TRACE.active:
                boundary = TRACE.now()
            guard.boundary(step, epoch, position)
            if TRACE.active:
                TRACE.span("checkpoint", "boundary (checkpoint, signals)", boundary)
                TRACE.span("step", f"step {step - 1}", begun)
                TRACE.set_step(None)
            if stopped:
                break
            fetched = time.perf_counter()
        traffic = (strategy.counters() - counters) / max(epoch_steps, 1)  # finishes a --zero all-gather first
        backend.synchronize()
        elapsed = time.perf_counter() - started
        wait = (strategy.wait_seconds() - waited) / elapsed if elapsed > 0 else 0.0
        record = {
            "epoch": epoch + 1,
            "step": step,
            "loss": comm.allreduce(read_scalar(sums["loss_sum"]), op=MPI.SUM) / max(sums["kept_steps"] * config.batch_size, 1),
            "lr": lr,
            "samples_per_s": epoch_steps * config.batch_size / elapsed if elapsed > 0 else 0.0,
            "elapsed_s": guard.elapsed(),
            "world_size": comm.size,
            **strategy.layout_metrics(),
            **busiest_rank(comm, traffic, wait, strategy.memory()),
            **validation_metrics(strategy.evaluate(val_x, val_y), config),
            **guard.metrics(),
        }
        # Rank 0's record on every rank: callbacks and the decisions below see the same bits everywhere.
        record = comm.bcast(record, root=0)
        improved, patience_out = tracker.observe(record)
        if improved and config.save_best:
            _save_best(config, strategy, widths, comm)
            best_written = True
        report.epoch(record)
        if callbacks.call("on_epoch_end", record, comm):
            stopped = "stopped by a callback"
        if patience_out:
            stopped = tracker.stopped = f"early stop: val_loss not better for {config.early_stop} epoch(s)"
        if position == spe:
            epoch, position = epoch + 1, 0
            guard.epoch_sums = {"loss_sum": 0.0, "kept_steps": 0}
        guard.boundary(step, epoch, position)

    train_seconds = time.perf_counter() - looped
    guard.finish(step, epoch, position)
    result = TrainResult(full_parameters(strategy, widths, np.dtype(config.dtype), comm), report.history)
    if config.save:
        save_model(config, result.parameters, config.save, comm)
    # A resumed run wrote its best file before the checkpoint, if its best epoch came before it.
    best_written = best_written or bool(config.save_best and tracker.best and os.path.exists(config.save_best))
    summary = summarize(config, report.history, step, start.step, train_seconds, guard.elapsed(), tracker.best,
                        stopped, written_files(config, guard.last_checkpoint, best_written), comm.size)
    result.summary = comm.bcast(summary, root=0)  # rank 0's timings, so every rank returns the same result
    report.finish(result.summary)
    dataset.close()
    strategy.close()
    return result


def _allreduce_note(config: TrainConfig, data_comm: MPI.Intracomm) -> str | None:
    """How gradients are summed, for the start-up line: with --allreduce auto, whose thresholds
    choose the algorithm (a tuning file's, or the built-in ones; under --zero, those of the
    reduce-scatter + all-gather pair). Collective on data_comm."""
    if data_comm.size == 1:
        return None
    if config.allreduce != "auto":
        return config.allreduce
    return f"auto, {describe_source(data_comm, sharded=config.zero > 0)}"


def _step_record(comm: MPI.Intracomm, config: TrainConfig, step: int, loss_sum: float, lr: float, seconds: float,
                 guard: Resilience) -> dict:
    """The record of one step: its global mean loss, rate, and time (rank 0's), the same on every
    rank. Collective on comm."""
    record = {"step": step, "loss": comm.allreduce(read_scalar(loss_sum), op=MPI.SUM) / config.batch_size, "lr": lr,
              "step_time_s": seconds, "samples_per_s": config.batch_size / seconds if seconds > 0 else 0.0,
              "elapsed_s": guard.elapsed()}
    return comm.bcast(record, root=0)


def _save_best(config: TrainConfig, strategy, widths: list[int], comm: MPI.Intracomm) -> None:
    """--save-best: the parameters of the best validation loss so far, replacing the file atomically.
    Collective on comm."""
    full = gather_pieces(strategy.pieces(), ["param"], strategy.holds_copy, widths, np.dtype(config.dtype), comm)
    save_model(config, full["param"] if full is not None else None, config.save_best, comm)


class _CallableModule(types.ModuleType):
    """`from mpitrain import train` finds this module, not the function of the same name (a package's
    submodule is set as its attribute once imported, whatever __init__ bound before), so calling the
    module calls train(): the short public name and `mpitrain.train.<helper>` both keep working."""

    def __call__(self, *args, **kwargs) -> TrainResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
