"""The data-parallel training loop.

Every rank holds the whole model, reads only its own rows of the HDF5 data, computes the
gradient of its share of the global batch, and the ranks sum their gradients with one
all-reduce of the flat gradient buffer per step. Gradients are scaled by 1/global_batch before
the sum, so the result is the mean over the global batch whatever the world size.

    mpitrain train                      # one process
    mpirun -n 4 mpitrain train          # four ranks, same global batch of 128
"""

import json
import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from mpitrain import checkpoint
from mpitrain.backend import Backend, limit_blas_threads, select_backend
from mpitrain.comm import agree
from mpitrain.comm.buckets import GradientSync
from mpitrain.config import TrainConfig, as_dict
from mpitrain.data import normalize
from mpitrain.data.hdf5 import H5Dataset
from mpitrain.data.rank import Batches, RankData, ensure_synthetic, load_rank_data, open_dataset
from mpitrain.errors import error_of
from mpitrain.nn.losses import MeanSquaredError, SoftmaxCrossEntropy
from mpitrain.nn.model import Sequential, parse_widths
from mpitrain.optim import SGD, Adam, schedule
from mpitrain.parallel.state import load_whole_model
from mpitrain.report import Reporter, TrainResult, validation_metrics
from mpitrain.resilience import Resilience


# ---------------------------------------------------------------------------- model and step


def make_model(config: TrainConfig, widths: list[int], backend: Backend) -> Sequential:
    return Sequential(widths, config.activation, xp=backend.xp, dtype=np.dtype(config.dtype), seed=config.seed)


def make_optimizer(config: TrainConfig, model: Sequential):
    if config.optimizer == "adam":
        return Adam(model.params, model.grads, lr=config.lr, weight_decay=config.weight_decay)
    return SGD(model.params, model.grads, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def make_loss(config: TrainConfig, backend: Backend):
    return SoftmaxCrossEntropy(backend.xp) if config.loss == "ce" else MeanSquaredError(backend.xp)


def evaluate(model, loss, x, y, config, comm) -> dict:
    """Validation loss and accuracy over every rank's validation rows. Collective on comm."""
    totals = np.zeros(3)
    if len(x):
        out = model.forward(x)
        totals[0] = float(loss.forward(out, y))
        totals[1] = float(loss.correct(out, y)) if config.loss == "ce" else 0.0
        totals[2] = len(x)
    comm.Allreduce(MPI.IN_PLACE, totals, op=MPI.SUM)
    return validation_metrics(totals, config)


# ---------------------------------------------------------------------------- the loop


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    return config.steps if config.steps is not None else config.epochs * steps_per_epoch


def train(config: TrainConfig, comm: MPI.Intracomm) -> TrainResult:
    """Train under `config` on the ranks of `comm`; every rank returns the same result. Collective.

    Raises mpitrain.preempt.Preempted on every rank when a signal stopped the run at a checkpoint.
    """
    guard = Resilience(config, comm)
    try:
        if config.sync == "ps":
            from mpitrain.parallel.ps import train_ps  # here: ps.py imports this module

            return train_ps(config, guard.comm)
        if config.tp > 1 or config.pp > 1 or config.micro_batches > 1:
            from mpitrain.parallel.train import grid_train  # here: the grid loop imports this module

            return grid_train(config, guard.comm)
        return _train(config, guard.comm, guard)
    finally:
        guard.close()


@dataclass
class RankSetup:
    """What one data-parallel rank trains with: its backend, rows, batches, model and loss."""

    backend: Backend
    dataset: H5Dataset
    data: RankData
    batches: Batches
    model: Sequential
    loss: SoftmaxCrossEntropy | MeanSquaredError
    val_x: object
    val_y: object


def prepare_rank(config: TrainConfig, widths: list[int], comm: MPI.Intracomm) -> RankSetup:
    """Backend, dataset, this rank's rows, model and loss for data parallelism over comm. Collective."""
    backend = select_backend(config.device, comm)
    if config.data is None:
        config.data = ensure_synthetic(config, widths, comm)
    dataset = open_dataset(config, widths, comm)
    data = load_rank_data(dataset, config, widths[-1], comm)
    batches = Batches(data, dataset, backend, config)
    model, loss = make_model(config, widths, backend), make_loss(config, backend)
    val_x = backend.xp.asarray(data.val_x, dtype=np.dtype(config.dtype))
    val_y = backend.xp.asarray(data.val_y, dtype=batches.label_dtype)
    return RankSetup(backend, dataset, data, batches, model, loss, val_x, val_y)


def _train(config: TrainConfig, comm: MPI.Intracomm, guard: Resilience) -> TrainResult:
    widths = parse_widths(config.model)
    threads = limit_blas_threads(comm, config.threads)
    rank = prepare_rank(config, widths, comm)
    backend, dataset, data, batches = rank.backend, rank.dataset, rank.data, rank.batches
    model, loss, val_x, val_y = rank.model, rank.loss, rank.val_x, rank.val_y
    if config.init_from:
        load_whole_model(config.init_from, model, comm)
    optimizer = make_optimizer(config, model)
    grad_sync = GradientSync(model.grads, model.layer_grad_slices(), comm, config.allreduce, config.bucket_mb, config.overlap)
    steps = total_steps(config, data.steps_per_epoch)
    scale = 1.0 / config.batch_size
    is_root = comm.rank == 0
    report = Reporter(config, comm.size, steps, is_root)
    report.start(backend, threads)
    start = guard.start(model, optimizer, dataset, data.steps_per_epoch, steps, report.say)

    step, epoch, position = start.step, start.epoch, start.position
    while step < steps:
        started, loss_sum, kept_steps, epoch_steps = time.perf_counter(), 0.0, 0, 0
        for x, y in batches.epoch(epoch, min(data.steps_per_epoch, position + steps - step), start=position):
            out = model.forward(x)
            step_loss = float(loss.forward(out, y))
            model.backward(loss.backward(scale), on_layer_done=grad_sync.layer_done)
            grad_sync.wait()
            if guard.keep_step(step_loss, model.grads):
                optimizer.step(schedule(config.schedule, config.lr, step, steps, config.warmup_steps))
                loss_sum += step_loss
                kept_steps += 1
            step += 1
            position += 1
            epoch_steps += 1
            report.advance()
            guard.boundary(step, epoch, position)
        backend.synchronize()
        elapsed = time.perf_counter() - started
        totals = comm.allreduce(loss_sum, op=MPI.SUM)
        record = {
            "epoch": epoch + 1,
            "step": step,
            "loss": totals / max(kept_steps * config.batch_size, 1),
            "samples_per_s": epoch_steps * config.batch_size / elapsed if elapsed > 0 else 0.0,
            "world_size": comm.size,
            **evaluate(model, loss, val_x, val_y, config, comm),
            **guard.metrics(),
        }
        report.epoch(record)
        if position == data.steps_per_epoch:
            epoch, position = epoch + 1, 0
        guard.boundary(step, epoch, position)

    guard.finish(step, epoch, position)
    result = TrainResult(model.state(), report.history)
    report.finish(result)
    if config.save:
        save_model(config, result, comm)
    dataset.close()
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


