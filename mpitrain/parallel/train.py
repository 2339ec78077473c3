"""The model-parallel training loop: data x pipeline x tensor parallelism on one process grid.

    mpirun -n 4 mpitrain train --model 784-4096-4096-10 --tp 2                  # dp 2 x tp 2
    mpirun -n 4 mpitrain train --model 784-4096-4096-10 --pp 2 --micro-batches 4 --pipeline-schedule gpipe
    mpirun -n 4 mpitrain train --tp 2 --pp 2 --init-from model.h5 --save tuned.h5

Each step, in each data-parallel group: every rank of the group's first stage takes the group's
rows of the global batch (all ranks of a tensor group read the same rows); the micro-batches flow
through the stages in schedule order; the last stage computes the loss (scaled by 1/global batch,
so gradients add up to the global-batch mean); then every rank sums its gradient shard over its
data-parallel group (the ranks that hold the same shard) and steps the optimizer on its shard.
"""

import time

import numpy as np
from mpi4py import MPI

from mpitrain.backend import limit_blas_threads, select_backend
from mpitrain.comm import allreduce
from mpitrain.config import TrainConfig
from mpitrain.nn.model import parse_widths
from mpitrain.optim import schedule
from mpitrain.parallel.grid import Grid, make_grid, plan_layout
from mpitrain.parallel.mappings import TensorGroup
from mpitrain.parallel.model import StageModel, initial_parameters
from mpitrain.parallel.pipeline import StageLink, bubble_fraction, micro_batch_bounds
from mpitrain.parallel.pipeline import schedule as pipeline_schedule
from mpitrain.parallel.state import gather_full_state, load_parameter_file
from mpitrain.data.rank import Batches, ensure_synthetic, load_rank_data, open_dataset
from mpitrain.report import Reporter, TrainResult, validation_metrics
from mpitrain.train import make_loss, make_optimizer, save_model, total_steps


def ring_bytes(nbytes: int, size: int) -> int:
    """Bytes each rank sends in a ring all-reduce of nbytes over size ranks: 2(p-1)/p of the buffer."""
    return 2 * (size - 1) * nbytes // size


class Stage:
    """This rank's stage of the pipeline: the sliced layers, the links to its neighbours, the loss."""

    def __init__(self, model: StageModel, link: StageLink, loss, grid: Grid):
        self.model, self.link, self.loss, self.grid = model, link, loss, grid
        self.dtype = model.dtype

    def step(self, x, y, scale: float, actions) -> float:
        """Run one step's schedule; gradients of the local shards end up in model.grads.
        Returns the summed loss of this rank's samples on the last stage, else 0."""
        model, link, grid = self.model, self.link, self.grid
        model.start_step()
        bounds = micro_batch_bounds(len(x), grid.layout.micro_batches)
        output_grads, loss_sum = {}, 0.0
        for action, micro in actions:
            start, stop = bounds[micro]
            if action == "F":
                if grid.first_stage:
                    inputs = x[start:stop]
                else:
                    inputs = link.recv_activation((stop - start, model.input_width), self.dtype, micro)
                out = model.forward(inputs, micro)
                if grid.last_stage:
                    loss_sum += float(self.loss.forward(out, y[start:stop]))
                    output_grads[micro] = self.loss.backward(scale)
                else:
                    link.send_activation(out, micro)
            else:
                if grid.last_stage:
                    dy = output_grads.pop(micro)
                else:
                    dy = link.recv_gradient((stop - start, model.output_width), self.dtype, micro)
                dx = model.backward(dy, micro)
                if not grid.first_stage:
                    link.send_gradient(dx, micro)
        link.finish()
        return loss_sum

    def evaluate(self, x, y, config: TrainConfig) -> dict:
        """Validation loss and accuracy over every data-parallel group's rows, through the pipeline
        without keeping activations. Collective on the world."""
        model, link, grid = self.model, self.link, self.grid
        totals = np.zeros(3)
        if len(x):
            inputs = x if grid.first_stage else link.recv_activation((len(x), model.input_width), self.dtype, 0)
            out = model.forward(inputs)
            if not grid.last_stage:
                link.send_activation(out, 0)
            elif grid.tp_rank == 0:
                totals[0] = float(self.loss.forward(out, y))
                totals[1] = float(self.loss.correct(out, y)) if config.loss == "ce" else 0.0
                totals[2] = len(x)
            link.finish()
        grid.world.Allreduce(MPI.IN_PLACE, totals, op=MPI.SUM)
        return validation_metrics(totals, config)


def grid_train(config: TrainConfig, comm: MPI.Intracomm) -> TrainResult:
    """Train under `config`'s layout on the ranks of `comm`; every rank returns the same full
    parameters. Collective on comm; a layout that does not fit raises before any message."""
    widths = parse_widths(config.model)
    layout = plan_layout(config, comm.size, widths)
    grid = make_grid(comm, layout)
    backend = select_backend(config.device, comm)
    threads = limit_blas_threads(comm, config.threads)
    if config.data is None:
        config.data = ensure_synthetic(config, widths, comm)
    dataset = open_dataset(config, widths, comm)
    data = load_rank_data(dataset, config, widths[-1], grid.dp_comm)
    batches = Batches(data, dataset, backend, config)

    xp = backend.xp
    model = StageModel(widths, config.activation, layout.stages[grid.pp_rank], TensorGroup(grid.tp_comm, xp),
                       xp, config.dtype, layout.micro_batches)
    if config.init_from:
        load_parameter_file(config.init_from, widths, model.load, comm)
    else:
        model.load(initial_parameters(widths, config.activation, config.seed))
    stage = Stage(model, StageLink(grid.pp_comm, xp), make_loss(config, backend), grid)
    optimizer = make_optimizer(config, model)
    actions = pipeline_schedule(layout.schedule, layout.pp, grid.pp_rank, layout.micro_batches)
    reports_loss = grid.last_stage and grid.tp_rank == 0

    steps = total_steps(config, data.steps_per_epoch)
    scale = 1.0 / config.batch_size
    val_x = xp.asarray(data.val_x, dtype=np.dtype(config.dtype))
    val_y = xp.asarray(data.val_y, dtype=batches.label_dtype)
    report = Reporter(config, comm.size, steps, comm.rank == 0)
    report.start(backend, threads)
    if comm.rank == 0:
        report.say(f"layout: {layout.describe()}")

    step, epoch = 0, 0
    while step < steps:
        started, loss_sum, epoch_steps = time.perf_counter(), 0.0, 0
        sent_before = (model.group.bytes_sent, stage.link.bytes_sent)
        wait_before, dp_bytes = stage.link.wait_s, 0
        for x, y in batches.epoch(epoch, min(data.steps_per_epoch, steps - step)):
            loss_sum += stage.step(x, y, scale, actions)
            allreduce(model.grads, grid.dp_comm, config.allreduce)
            dp_bytes += ring_bytes(model.grads.nbytes, layout.dp)
            optimizer.step(schedule(config.schedule, config.lr, step, steps, config.warmup_steps))
            step += 1
            epoch_steps += 1
            report.advance()
        backend.synchronize()
        elapsed = time.perf_counter() - started
        per_step = max(epoch_steps, 1)
        mine = np.array([
            model.params.nbytes,
            model.peak_bytes,
            (model.group.bytes_sent - sent_before[0]) / per_step,
            (stage.link.bytes_sent - sent_before[1]) / per_step,
            dp_bytes / per_step,
            (stage.link.wait_s - wait_before) / elapsed if elapsed > 0 else 0.0,
            0.0,
        ], dtype=np.float64)
        mine[6] = mine[2:5].sum()
        worst = np.empty_like(mine)
        comm.Allreduce(mine, worst, op=MPI.MAX)
        totals = comm.allreduce(loss_sum if reports_loss else 0.0, op=MPI.SUM)
        record = {
            "epoch": epoch + 1,
            "step": step,
            "loss": totals / max(epoch_steps * config.batch_size, 1),
            "samples_per_s": epoch_steps * config.batch_size / elapsed if elapsed > 0 else 0.0,
            "world_size": comm.size,
            "dp": layout.dp, "tp": layout.tp, "pp": layout.pp,
            "micro_batches": layout.micro_batches,
            "bubble_fraction": bubble_fraction(layout.pp, layout.micro_batches),
            "pipeline_wait_fraction": float(worst[5]),
            "param_bytes_per_rank": int(worst[0]),
            "activation_bytes_per_rank": int(worst[1]),
            "tp_bytes_per_step": int(worst[2]),
            "pp_bytes_per_step": int(worst[3]),
            "dp_bytes_per_step": int(worst[4]),
            "sent_bytes_per_step": int(worst[6]),
            **stage.evaluate(val_x, val_y, config),
        }
        report.epoch(record)
        epoch += 1

    parameters = gather_full_state(model.shards(), grid.dp_rank == 0, widths, np.dtype(config.dtype), comm)
    result = TrainResult(parameters, report.history)
    report.finish(result)
    if config.save:
        save_model(config, result, comm)
    dataset.close()
    grid.free()
    return result
