"""A parameter-server run: workers on the shared step code and hooks, servers in their own loop.

    mpirun -n 4 mpitrain train --sync ps --checkpoint-dir ck --checkpoint-every 50 --resume auto
    mpirun -n 4 mpitrain train --sync ps --ps-mode async --on-nan skip

Workers set up their rows and batches as every layout does (data/rank.py) and compute each
gradient with the Stage of every layout (parallel/stage.py); servers run the serving loops of
ps.py. The run is cut into segments that end at every checkpoint step and at the last step;
between segments every rank of the job meets, so a checkpoint is written by the same collective
hook as in every other layout (resilience.py), with the servers' ranges of θ and of the optimizer
state as pieces of the unsliced arrays. Within a segment nothing is collective: a worker sends
its flags with each gradient (a non-finite loss or gradient, a signal, a non-finite input row),
and server 0 ends the segment early, for every rank alike, when a flag calls for a stop.

What a resume repeats: in sync mode with --staleness 0 a resumed run equals the uninterrupted one
bit for bit (every update is the sum, in worker order, of the same gradients on the same θ). With --staleness K or
--ps-mode async, which gradient is computed on which θ depends on timing, so a resume continues
from the saved θ, optimizer state and global step but does not repeat the interrupted run.
"""

import time
from types import SimpleNamespace

import numpy as np
from mpi4py import MPI

from mpitrain.backend import CPU, limit_blas_threads, read_scalar, select_backend, step_finite
from mpitrain.comm import agree
from mpitrain.comm.ring import chunk_bounds
from mpitrain.config import TrainConfig
from mpitrain.data.rank import Batches, ensure_synthetic, load_rank_data, open_dataset
from mpitrain.errors import MpitrainError, error_of
from mpitrain.memory import check_memory
from mpitrain.nn.losses import make_loss
from mpitrain.nn.model import Model, flat_offsets, full_shapes, parse_widths
from mpitrain.optim import buffer_names, schedule
from mpitrain.preflight import check_outputs
from mpitrain.parallel.pipeline import StageLink
from mpitrain.parallel.ps import (FLAG_BAD_INPUT, FLAG_NONFINITE, FLAG_SIGNAL, Roles, WorkerLink, check_config,
                                  check_drained, describe, share_parameters)
from mpitrain.parallel.ps_server import Server, ServerStats, Stop
from mpitrain.parallel.stage import Stage
from mpitrain.parallel.state import init_from, save_model
from mpitrain.report import Reporter, TrainResult, busiest_rank, summarize, validation_metrics, written_files
from mpitrain.resilience import Position, dataset_shape, signal_reason
from mpitrain.trace import TRACE


class Worker:
    """A worker's setup: its backend, rows, batches and whole model, and the Stage that runs its
    forward and backward (the step code of every layout, with one stage and one micro-batch)."""

    def __init__(self, config: TrainConfig, widths: list[int], comm: MPI.Intracomm):
        self.config = config
        self.backend = backend = select_backend(config.device, comm)
        if config.data is None:
            config.data = ensure_synthetic(config, widths, comm)
        self.dataset = open_dataset(config, widths, comm)
        check_memory(config, widths, comm, self.dataset, job_size=comm.size + config.servers)
        self.data = load_rank_data(self.dataset, config, widths[-1], comm)
        self.batches = Batches(self.data, self.dataset, backend, config)
        xp = backend.xp
        self.model = Model(widths, config.activation, xp, config.dtype, config.seed)
        self.stage = Stage(self.model, StageLink(MPI.COMM_SELF, xp), make_loss(config.loss, xp), [("F", 0), ("B", 0)],
                           1, first_stage=True, last_stage=True)
        self.val_x = xp.asarray(self.data.val_x, dtype=np.dtype(config.dtype))
        self.val_y = xp.asarray(self.data.val_y, dtype=self.batches.label_dtype)
        self.error: str | None = None  # the bad input row this worker flagged, if any
        self.epochs: list[dict] = []
        self.current = {"pushes": 0, "samples": 0, "kept_samples": 0, "loss_sum": 0.0,
                        "started": time.perf_counter()}

    def evaluate(self, comm: MPI.Intracomm) -> dict:
        """Validation over every worker's rows of comm under the θ each holds. Collective on comm."""
        totals = self.stage.evaluate(self.val_x, self.val_y, True)
        comm.Allreduce(MPI.IN_PLACE, totals, op=MPI.SUM)
        return validation_metrics(totals, self.config)

    def stream(self, epoch: int, position: int):
        """(x, y) batches from `position` of `epoch` on, epoch after epoch; each finished epoch
        appends its entry (pushes, samples, loss, seconds, validation of this worker's rows)."""
        spe = self.data.steps_per_epoch
        while True:
            self.current = {"pushes": 0, "samples": 0, "kept_samples": 0, "loss_sum": 0.0,
                            "started": time.perf_counter()}
            for x, y in self.batches.epoch(epoch, spe, start=position):
                yield x, y
            self.close_epoch()
            epoch, position = epoch + 1, 0

    def close_epoch(self) -> None:
        """Append the current epoch's entry (also a partial one at the end of the run)."""
        current = self.current
        if current["pushes"]:
            self.epochs.append({"pushes": current["pushes"], "samples": current["samples"],
                                "kept_samples": current["kept_samples"],
                                "loss_sum": read_scalar(current["loss_sum"]), "seconds": time.perf_counter() - current["started"],
                                "val": self.evaluate(MPI.COMM_SELF), "val_rows": len(self.val_x)})
        current["pushes"] = 0


def work(worker: Worker, batches, link: WorkerLink, scale: float, signalled, report: Reporter) -> None:
    """One segment of a worker: gradients pushed, each tagged with its flags, until server 0 says stop."""
    go = link.pull()
    while go:
        if TRACE.active:
            TRACE.set_step(0 if TRACE.step is None else TRACE.step + 1)  # this worker's pushes, counted from 0
        x, y = next(batches)
        loss = worker.stage.forward_backward(x, y, scale)
        flags = 0
        if not step_finite(loss, worker.model.grads):
            flags |= FLAG_NONFINITE
        if worker.batches.bad_input:
            flags |= FLAG_BAD_INPUT
            worker.error = worker.error or worker.batches.bad_input
        if signalled():
            flags |= FLAG_SIGNAL
        go = link.push_pull(flags)
        current = worker.current
        current["pushes"] += 1
        current["samples"] += len(x)
        if not flags & FLAG_NONFINITE:  # as every layout: a skipped step's loss is not averaged
            current["loss_sum"] = current["loss_sum"] + loss  # on the device; read once per segment
            current["kept_samples"] += len(x)
        report.advance()


class ServerState:
    """The parameter server's layout as the checkpoint hooks see it (resilience.py): servers hold
    one copy of θ and the optimizer state as ('flat', a, b) pieces of the unsliced parameters;
    workers hold nothing but know the optimizer's buffer names. Every rank builds one."""

    def __init__(self, config: TrainConfig, widths: list[int], roles: Roles, server: Server | None,
                 comm: MPI.Intracomm):
        self.config, self.widths, self.roles, self.server, self.comm = config, widths, roles, server, comm
        self.holds_copy = server is not None
        self.optimizer = server.optimizer if server else SimpleNamespace(
            buffers=dict.fromkeys(buffer_names(config)), t=0)

    def pieces(self, residual=None) -> list[tuple[str, tuple, dict]]:
        """Every server's range of θ and of the optimizer state; workers hold none. `residual` is
        always None here: workers send full-precision gradients (--grad-dtype needs --sync allreduce)."""
        if self.server is None:
            return []
        a, b = self.roles.bounds[self.roles.server_index]
        out = []
        for name, start in flat_offsets(self.widths).items():
            stop = start + int(np.prod(full_shapes(self.widths)[name]))
            lo, hi = max(a, start), min(b, stop)
            if lo < hi:
                views = {"param": self.server.params[lo - a:hi - a]}
                views.update({buffer: flat[lo - a:hi - a] for buffer, flat in self.optimizer.buffers.items()})
                out.append((name, ("flat", lo - start, hi - start), views))
        return out

    def residual_sum(self) -> None:
        """No gradient-compression residual to save (--sync ps has no --grad-dtype): see pieces."""
        return None

    def residual_buffer(self) -> None:
        """No gradient-compression residual to read a checkpoint's into."""
        return None

    def optimizer_t(self) -> int:
        """The servers' optimizer step count on every rank. Collective."""
        return self.comm.bcast(self.optimizer.t if self.server else None, root=self.roles.server_rank(0))

    def layout_metrics(self) -> dict:
        return {"dp": self.roles.n_workers, "tp": 1, "pp": 1, "micro_batches": 1, "bubble_fraction": 0.0,
                "servers": len(self.roles.bounds), "ps_mode": self.config.ps_mode}


def run(config: TrainConfig, guard) -> TrainResult:
    """Train under `config` with workers and parameter servers on the ranks of guard.comm; every
    rank returns the same result, whose last history record holds the servers' counts. Collective.

    Raises MpitrainError on every rank for bad input, a non-finite step under --on-nan abort, or a
    non-finite input row, and Preempted on every rank when a signal stopped the run (at a
    checkpoint when checkpointing).
    """
    comm = guard.comm
    check_config(config, comm.size)
    check_outputs(config, comm)
    widths = parse_widths(config.model)
    check_memory(config, widths, comm)
    n_params = sum(int(np.prod(shape)) for shape in full_shapes(widths).values())
    roles = Roles(comm.rank, comm.size - config.servers, tuple(chunk_bounds(n_params, config.servers)))
    first_server = roles.server_rank(0)
    ps = comm.Dup()
    workers = comm.Split(MPI.UNDEFINED if roles.is_server else 0, comm.rank)
    threads = limit_blas_threads(comm, config.threads)

    worker, error = None, None
    if not roles.is_server:
        try:
            worker = Worker(config, widths, workers)
        except MpitrainError as exc:
            error = exc
    agree(comm, error)
    spe, shape = comm.bcast((worker.data.steps_per_epoch, dataset_shape(worker.dataset)) if comm.rank == 0 else None)
    steps = config.steps if config.steps is not None else config.epochs * spe
    schedule(config.schedule, config.lr, 0, steps, config.warmup_steps)  # a bad warm-up fails here, everywhere

    # Servers build the model on the host from the same seed, so their θ starts as the workers' does.
    model = worker.model if worker else Model(widths, config.activation, np, config.dtype, config.seed)
    server = None
    if roles.is_server:
        a, b = roles.bounds[roles.server_index]
        server = Server(ps, roles, config, model.params[a:b], steps, guard.signalled, spe)
    state = ServerState(config, widths, roles, server, comm)
    if config.init_from:
        init_from(config.init_from, state.pieces(), widths, comm)
    report = Reporter(config, comm.size, steps, comm.rank == 0)
    agree(comm, error_of(report.start, worker.backend if worker else CPU, threads))
    report.say(describe(config, roles))
    step = first = guard.start(state, shape, spe, steps, report.say).step
    if server:
        server.skipped = guard.skipped  # a resumed run goes on counting
    agree(comm, error_of(report.continue_from, step))

    if server and TRACE.active:  # a server has no steps of its own: --trace-steps counts the workers' pushes
        TRACE.window = None
        TRACE.set_step(None)
    link = WorkerLink(ps, roles, model) if worker else None
    batches = worker.stream(step // spe, step % spe) if worker else None
    every = config.checkpoint_every
    looped = time.perf_counter()
    while step < steps:
        end = min(steps, (step // every + 1) * every) if every else steps
        if server:
            server.serve(step, end)
        else:
            work(worker, batches, link, 1.0 / config.batch_size, guard.signalled, report)
        # Signal messages between servers still in flight are received before anyone moves on.
        sent = ps.allreduce(int(bool(server and server.signal_sent)), op=MPI.SUM)
        if server and server.leader:
            server.drain_signals(sent)
        outcome = ps.bcast((server.step, server.skipped, server.stop) if server else None, root=first_server)
        step, guard.skipped, stop = outcome
        guard.set_step(step)
        # A signal that arrived after a rank's last message of the segment stops the run here.
        if stop is None and step < steps and ps.allreduce(int(guard.signalled()), op=MPI.MAX):
            stop = Stop("signal")
        _raise_on_stop(stop, worker, ps, guard, step, spe)
        if config.checkpoint_dir and (step == steps or (every and step % every == 0)):
            guard.write(Position(step, step // spe, step % spe))

    train_seconds = time.perf_counter() - looped
    theta = link.params if link else model.params
    share_parameters(ps, roles, theta)
    final_val = {}
    if worker:
        if not link.on_host:
            model.params.set(theta)
        worker.close_epoch()
        final_val = worker.evaluate(workers)
        worker.dataset.close()
        workers.Free()
    usage = _usage(config, roles, model, server, comm)
    outcomes = ps.gather(worker.epochs if worker else server.stats)
    records = None
    if comm.rank == 0:
        records = epoch_records(outcomes[:roles.n_workers], final_val, comm.size, first, first // spe)
        for record in records:
            record.update({**state.layout_metrics(), **usage, "skipped_steps": guard.skipped})
        if records:
            records[-1].update(server_summary(config, outcomes[roles.n_workers:]))
    for record in ps.bcast(records, root=0):
        # The servers' rate at the record's last step: the fields every layout's epoch record has.
        record["lr"] = schedule(config.schedule, config.lr, max(record["step"] - 1, 0), steps, config.warmup_steps,
                                **guard.tracker.schedule_options(spe))
        record["elapsed_s"] = guard.elapsed()
        guard.tracker.observe(record)
        report.epoch(record)
    check_drained(ps)
    ps.Free()
    result = TrainResult(model.state(), report.history)
    if config.save:
        save_model(config, result.parameters, config.save, comm)
    summary = summarize(config, report.history, step, first, train_seconds, guard.elapsed(), guard.tracker.best,
                        None, written_files(config, guard.last_checkpoint, False), comm.size)
    result.summary = comm.bcast(summary, root=0)
    report.finish(result.summary)
    return result


def _raise_on_stop(stop: Stop | None, worker: Worker | None, ps: MPI.Intracomm, guard, step: int, spe: int) -> None:
    """After a segment server 0 ended early: the same exception on every rank. Collective on ps."""
    if stop is None:
        return
    if stop.reason == "input":
        message = ps.bcast(worker.error if worker else None, root=stop.worker)
        raise MpitrainError(message)
    if stop.reason == "nan":
        raise MpitrainError(f"step {stop.step + 1}: NaN or Inf in the gradient of worker {stop.worker}; "
                            "--on-nan skip would drop such steps instead")
    guard.stop(Position(step, step // spe, step % spe), signal_reason(ps, guard.flag.signum if guard.flag else 0))


# ---------------------------------------------------------------------------- reporting


def _usage(config: TrainConfig, roles: Roles, model: Model, server: Server | None, comm: MPI.Intracomm) -> dict:
    """Bytes sent per step and memory of the busiest rank, in the fields of every layout's record.
    Per global step a worker sends its whole gradient (to the servers, range by range) and a server
    sends its range of θ to each of the W workers; the exchange is the run's data-parallel traffic.
    Collective on comm."""
    itemsize = np.dtype(config.dtype).itemsize
    if server is not None:
        a, b = roles.bounds[roles.server_index]
        sent = roles.n_workers * (b - a) * itemsize
        optimizer = sum(buffer.nbytes for buffer in server.optimizer.buffers.values())
        memory = [server.params.nbytes, server.grad_bytes, optimizer, 0]
    else:
        sent, memory = model.params.nbytes, [model.params.nbytes, model.grads.nbytes, 0, model.peak_bytes]
    return busiest_rank(comm, np.array([0, 0, sent], dtype=np.float64), 0.0, np.array(memory, dtype=np.float64))


def epoch_records(per_worker: list[list[dict]], final_val: dict, world: int, start: int = 0,
                  first_epoch: int = 0) -> list[dict]:
    """One record per epoch, summed over the workers that reached it; `step` counts updates of a
    global batch (gradients / W) from the run's first step `start`, `epoch` from its first epoch
    (both 0 unless resumed); the last record's validation is that of the final θ."""
    n_workers, records = len(per_worker), []
    pushed = start * n_workers
    for e in range(max(len(epochs) for epochs in per_worker)):
        entries = [epochs[e] for epochs in per_worker if len(epochs) > e]
        pushed += sum(entry["pushes"] for entry in entries)
        samples = sum(entry["samples"] for entry in entries)
        seconds = max(entry["seconds"] for entry in entries)
        kept = sum(entry["kept_samples"] for entry in entries)
        record = {"epoch": first_epoch + e + 1, "step": pushed // n_workers,
                  "loss": sum(entry["loss_sum"] for entry in entries) / max(kept, 1),
                  "samples_per_s": samples / seconds if seconds > 0 else 0.0, "world_size": world}
        rows = sum(entry["val_rows"] for entry in entries)
        for key in entries[0]["val"]:  # val_loss, val_accuracy: means over rows, so weight by rows
            record[key] = sum(entry["val"][key] * entry["val_rows"] for entry in entries) / rows
        records.append(record)
    if records:
        records[-1].update(final_val)
    return records


def server_summary(config: TrainConfig, stats: list[ServerStats]) -> dict:
    """Per-worker gradient counts (every server sees each worker's every gradient) and staleness over all servers."""
    counts = [0] * max(len(s.staleness_counts) for s in stats)
    for s in stats:
        for k, n in enumerate(s.staleness_counts):
            counts[k] += n
    return {"ps_mode": config.ps_mode, "staleness_bound": config.staleness if config.ps_mode == "sync" else None,
            "servers": len(stats), "workers": len(stats[0].updates_per_worker),
            "updates_per_worker": stats[0].updates_per_worker, "max_staleness": len(counts) - 1,
            "staleness_counts": counts}
