"""The training loop: one loop for every layout.

    mpitrain train                                      # one process
    mpirun -n 4 mpitrain train                          # data parallel, the same global batch of 128
    mpirun -n 4 mpitrain train --tp 2 --pp 2 --micro-batches 4 --checkpoint-dir ck --resume auto
    mpirun -n 4 mpitrain train --sync ps --ps-mode async

Every step: this rank's batch (data/rank.py), the layout's forward and backward with its gradient
sum (a strategy chosen once from the flags, parallel/strategy.py: data x tensor x pipeline), the
agreed NaN/signal check, the update, and the boundary hooks (periodic checkpoint, preemption) of
resilience.py. After each epoch: validation and one metrics record. The parameter server
(--sync ps) runs from parallel/ps_train.py: its workers use the same step code, data, checkpoint
writer and record fields, but agree through the servers instead of a per-step collective. Gradients are scaled by
1/global_batch, so the result is the global-batch mean whatever the world size and layout.
"""

import json
import os
import time

import numpy as np
from mpi4py import MPI

from mpitrain import checkpoint
from mpitrain.backend import limit_blas_threads, select_backend
from mpitrain.comm import agree, fingerprint
from mpitrain.config import TrainConfig, as_dict
from mpitrain.data import normalize
from mpitrain.data.rank import Batches, ensure_synthetic, load_rank_data, open_dataset
from mpitrain.errors import error_of
from mpitrain.memory import check_memory
from mpitrain.nn.model import parse_widths
from mpitrain.optim import schedule
from mpitrain.preflight import check_outputs
from mpitrain.parallel import ps_train
from mpitrain.parallel.state import full_parameters, init_from
from mpitrain.parallel.strategy import GridStrategy
from mpitrain.report import Reporter, TrainResult, busiest_rank, validation_metrics
from mpitrain.resilience import Resilience, dataset_shape
from mpitrain.trace import TRACE


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    return config.steps if config.steps is not None else config.epochs * steps_per_epoch


def train(config: TrainConfig, comm: MPI.Intracomm) -> TrainResult:
    """Train under `config` on the ranks of `comm`; every rank returns the same result. Collective.

    Raises MpitrainError on every rank for bad input or a layout that does not fit, and
    mpitrain.preempt.Preempted on every rank when a signal stopped the run at a checkpoint.
    """
    if config.check_collectives:
        fingerprint.enable()
    trace_path = config.trace or os.environ.get("MPITRAIN_TRACE")
    if trace_path:
        TRACE.start(trace_path, config.trace_steps, comm)
    guard = Resilience(config, comm)
    try:
        if config.sync == "ps":
            result = ps_train.run(config, guard)
            if config.save:
                save_model(config, result, guard.comm)
        else:
            result = _loop(config, guard.comm, guard, GridStrategy)
    except BaseException:
        TRACE.dump_local()  # the other ranks may not reach a gather: each keeps what it has
        raise
    finally:
        guard.close()
    TRACE.finish(comm)
    return result


def _loop(config: TrainConfig, comm: MPI.Intracomm, guard: Resilience, make_strategy) -> TrainResult:
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
    steps = total_steps(config, data.steps_per_epoch)
    schedule(config.schedule, config.lr, 0, steps, config.warmup_steps)  # a bad warm-up fails here, everywhere
    report = Reporter(config, comm.size, steps, comm.rank == 0)
    agree(comm, error_of(report.start, backend, threads))
    report.say(strategy.describe())
    start = guard.start(strategy, dataset_shape(dataset), data.steps_per_epoch, steps, report.say)
    strategy.share_parameters()
    agree(comm, error_of(report.continue_from, start.step))

    step, epoch, position = start.step, start.epoch, start.position
    while step < steps:
        started, epoch_steps, sums = time.perf_counter(), 0, guard.epoch_sums
        counters, waited = strategy.counters(), strategy.wait_seconds()
        fetched = time.perf_counter()
        for x, y in batches.epoch(epoch, min(data.steps_per_epoch, position + steps - step), start=position):
            if TRACE.active:
                TRACE.set_step(step)
                begun = TRACE.now()
                TRACE.span("data", "batch", fetched, begun)
            step_loss = strategy.forward_backward(x, y)
            keep = guard.keep_step(step_loss, strategy.grads, batches.bad_input)
            if TRACE.active:
                updating = TRACE.now()
            strategy.update(schedule(config.schedule, config.lr, step, steps, config.warmup_steps), keep)
            if TRACE.active:
                TRACE.span("optimizer", "update", updating, kept=bool(keep))
            if keep:
                sums["loss_sum"] += step_loss
                sums["kept_steps"] += 1
            step += 1
            position += 1
            epoch_steps += 1
            report.advance()
            if TRACE.active:
                boundary = TRACE.now()
            guard.boundary(step, epoch, position)
            if TRACE.active:
                TRACE.span("checkpoint", "boundary (checkpoint, signals)", boundary)
                TRACE.span("step", f"step {step - 1}", begun)
                TRACE.set_step(None)
            fetched = time.perf_counter()
        backend.synchronize()
        elapsed = time.perf_counter() - started
        traffic = (strategy.counters() - counters) / max(epoch_steps, 1)
        wait = (strategy.wait_seconds() - waited) / elapsed if elapsed > 0 else 0.0
        record = {
            "epoch": epoch + 1,
            "step": step,
            "loss": comm.allreduce(sums["loss_sum"], op=MPI.SUM) / max(sums["kept_steps"] * config.batch_size, 1),
            "samples_per_s": epoch_steps * config.batch_size / elapsed if elapsed > 0 else 0.0,
            "world_size": comm.size,
            **strategy.layout_metrics(),
            **busiest_rank(comm, traffic, wait, strategy.memory()),
            **validation_metrics(strategy.evaluate(val_x, val_y), config),
            **guard.metrics(),
        }
        report.epoch(record)
        if position == data.steps_per_epoch:
            epoch, position = epoch + 1, 0
            guard.epoch_sums = {"loss_sum": 0.0, "kept_steps": 0}
        guard.boundary(step, epoch, position)

    guard.finish(step, epoch, position)
    result = TrainResult(full_parameters(strategy, widths, np.dtype(config.dtype), comm), report.history)
    report.finish(result)
    if config.save:
        save_model(config, result, comm)
    dataset.close()
    strategy.close()
    return result


def save_model(config: TrainConfig, result: TrainResult, comm: MPI.Intracomm) -> None:
    """Rank 0 writes the final parameters; every rank learns whether the write worked."""
    error = None
    if comm.rank == 0:
        attrs = {"model": config.model, "activation": config.activation, "config": json.dumps(as_dict(config))}
        stats, stats_attrs = normalize.file_entries(normalize.attached(config))
        named, attrs = {**result.parameters, **stats}, {**attrs, **stats_attrs}
        error = error_of(checkpoint.save_parameters, config.save, named, attrs)
    agree(comm, error)

