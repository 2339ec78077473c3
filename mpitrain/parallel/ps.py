"""Parameter-server training: S server ranks hold θ and the optimizer, the other ranks compute gradients.

    mpirun -n 4 mpitrain train --sync ps                             # 3 workers, 1 server, synchronous
    mpirun -n 4 mpitrain train --sync ps --ps-mode async             # each gradient applied on arrival
    mpirun -n 6 mpitrain train --sync ps --servers 2 --staleness 2   # stale-synchronous, 2 servers

Roles. Of P ranks, ranks 0..W-1 are workers and the last S are servers (W = P - S), so rank 0, which
reports, is a worker. The flat parameter buffer is cut into S contiguous ranges (`chunk_bounds`);
server s holds θ[a_s:b_s] and the optimizer state of that range. The workers form a communicator of
their own (a Split of the job) and set up their data exactly as data-parallel ranks do in train.py.

Messages, point-to-point on a Dup of the job's communicator; every size is fixed by the ranges:
    TAG_GRAD    worker -> server s   ∇[a_s:b_s]   b_s - a_s values of --dtype
    TAG_PARAMS  server s -> worker   θ[a_s:b_s]   "compute another gradient"
    TAG_STOP    server s -> worker   θ[a_s:b_s]   "your last gradient is in: stop"
A worker first receives θ from every server; then, each step, it posts its receives for θ, sends its
gradient slices and waits for all of them; server 0's tag says whether it goes on. A server takes
gradients from any worker (Mprobe, then Mrecv) and answers each with exactly one θ message, a blocking
Send that cannot hang because the worker posted its receive before it sent. Every gradient sent is
received and applied, so when the servers leave their loops nothing is in flight.

Modes (gradients are scaled by 1/global batch, as in train.py):
    sync   Update c is the sum of every worker's c-th gradient: the mathematics of all-reduce data
           parallelism. With --staleness K a worker may start its step c once updates 0..c-K-1 are
           applied, i.e. run up to K steps ahead of the slowest worker on θ that lacks the newest
           updates (stale-synchronous parallel); K = 0 is lock-step.
    async  Each gradient is applied as it arrives and answered at once. The run spends the same number
           of gradients as sync (steps x W); server 0 hands them out one at a time, so fast workers
           compute more of them than slow ones and one slow worker no longer paces the job.
The staleness of a gradient is the number of updates applied between the θ it was computed on and its
own application. --staleness-lr weighs each gradient by 1 / (1 + staleness): in async mode through
the learning rate of its update, in sync mode inside the sum (the same thing for plain SGD).
Servers keep θ and the optimizer state in host memory (NumPy) whatever --device says.
"""

import time
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from mpitrain.backend import CPU, limit_blas_threads, select_backend
from mpitrain.comm import agree
from mpitrain.comm.ring import chunk_bounds
from mpitrain.config import TrainConfig
from mpitrain.data.rank import Batches, ensure_synthetic, load_rank_data, open_dataset
from mpitrain.errors import MpitrainError, error_of
from mpitrain.nn.losses import make_loss
from mpitrain.nn.model import Model, full_shapes, parse_widths
from mpitrain.optim import make_optimizer, schedule
from mpitrain.parallel.pipeline import StageLink
from mpitrain.parallel.stage import Stage
from mpitrain.parallel.state import init_from, param_pieces
from mpitrain.report import Reporter, TrainResult, validation_metrics

TAG_GRAD = 61
TAG_PARAMS = 62
TAG_STOP = 63


# ---------------------------------------------------------------------------- roles


def check_config(config: TrainConfig, world: int) -> None:
    """Refuse settings that cannot work, then a layout without a worker or a server; run on every
    rank before any message."""
    if config.tp > 1 or config.pp > 1 or config.micro_batches > 1:
        raise MpitrainError("--sync ps keeps the whole model on every worker: it does not combine with "
                            "--tp, --pp or --micro-batches")
    if config.servers < 1:
        raise MpitrainError(f"--servers {config.servers}: must be at least 1")
    if config.staleness < 0:
        raise MpitrainError(f"--staleness {config.staleness}: must be 0 or more")
    if config.ps_mode == "async" and config.staleness:
        raise MpitrainError(f"--staleness {config.staleness} bounds --ps-mode sync (stale-synchronous); "
                            "--ps-mode async has no bound")
    if world < 2:
        raise MpitrainError(f"--sync ps needs at least 2 ranks (a server and a worker) but the job has {world}: "
                            "launch it with mpirun -n 2 or more")
    if config.servers >= world:
        raise MpitrainError(f"--servers {config.servers} leaves no worker in a job of {world} ranks: "
                            f"use at most {world - 1}")


@dataclass(frozen=True)
class Roles:
    """Workers are ranks 0..W-1, servers W..P-1; server s holds θ[bounds[s][0]:bounds[s][1]]."""

    rank: int
    n_workers: int
    bounds: tuple[tuple[int, int], ...]

    @property
    def is_server(self) -> bool:
        return self.rank >= self.n_workers

    @property
    def server_index(self) -> int:
        return self.rank - self.n_workers

    def server_rank(self, s: int) -> int:
        return self.n_workers + s


def describe(config: TrainConfig, roles: Roles) -> str:
    last = roles.n_workers + len(roles.bounds) - 1
    if config.ps_mode == "async":
        mode = "async (each gradient applied on arrival)"
    elif config.staleness:
        mode = f"stale-synchronous (workers up to {config.staleness} step(s) ahead)"
    else:
        mode = "sync (one update per step from every worker)"
    return (f"parameter server: workers 0-{roles.n_workers - 1}, servers {roles.n_workers}-{last} "
            f"({len(roles.bounds)} range(s) of θ), {mode}")


# ---------------------------------------------------------------------------- messages: worker side


class WorkerLink:
    """A worker's end of its links to the servers: ∇ out, θ in, through host buffers.

    On the CPU the model's own flat buffers are sent and received into, with no copy; a CuPy model is
    staged through host copies (the MPICH wheel is not CUDA-aware).
    """

    def __init__(self, comm: MPI.Intracomm, roles: Roles, model: Model):
        self.comm, self.roles, self.model = comm, roles, model
        self.on_host = isinstance(model.params, np.ndarray)
        if self.on_host:
            self.params, self.grads = model.params, model.grads
        else:
            self.params = np.empty(model.params.shape, dtype=model.params.dtype)
            self.grads = np.empty_like(self.params)

    def pull(self) -> bool:
        """Receive the first θ from every server; True if server 0 asks for a gradient."""
        return self._exchange(push=False)

    def push_pull(self) -> bool:
        """Send ∇[a_s:b_s] to every server s and receive the θ[a_s:b_s] each answers with; True to go on."""
        if not self.on_host:
            self.model.grads.get(out=self.grads)
        return self._exchange(push=True)

    def _exchange(self, push: bool) -> bool:
        ranges = list(enumerate(self.roles.bounds))
        # Receives first, so every answer lands in a posted buffer and a server's blocking Send returns.
        requests = [self.comm.Irecv(self.params[a:b], self.roles.server_rank(s), MPI.ANY_TAG) for s, (a, b) in ranges]
        if push:
            requests += [self.comm.Isend(self.grads[a:b], self.roles.server_rank(s), TAG_GRAD) for s, (a, b) in ranges]
        statuses = [MPI.Status() for _ in requests]
        MPI.Request.Waitall(requests, statuses)
        if not self.on_host:
            self.model.params.set(self.params)
        return statuses[0].Get_tag() == TAG_PARAMS


def share_parameters(comm: MPI.Intracomm, roles: Roles, theta: np.ndarray) -> None:
    """theta <- the servers' final θ on every rank: one Bcast of each server's range. Collective on comm."""
    for s, (a, b) in enumerate(roles.bounds):
        comm.Bcast(theta[a:b], root=roles.server_rank(s))


def check_drained(comm: MPI.Intracomm) -> None:
    """Fail loudly if a message of the run was never received: the protocol answers every message,
    so one left over would be a bug that a later run on the same communicator could trip over."""
    status = MPI.Status()
    if comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG, status):
        raise RuntimeError(f"parameter server: rank {comm.rank} holds an unreceived message "
                           f"from rank {status.Get_source()} with tag {status.Get_tag()}")


# ---------------------------------------------------------------------------- the server


@dataclass
class ServerStats:
    """What one server saw: gradients applied per worker, and how many were applied k updates late."""

    updates_per_worker: list[int]
    staleness_counts: list[int] = field(default_factory=list)

    def record(self, worker: int, staleness: int) -> None:
        self.updates_per_worker[worker] += 1
        if staleness >= len(self.staleness_counts):
            self.staleness_counts += [0] * (staleness + 1 - len(self.staleness_counts))
        self.staleness_counts[staleness] += 1


class Server:
    """θ[a:b] of one server, its optimizer, and the two serving loops.

    `version` counts the updates applied to this range; `pulled[w]` is the version worker w last
    received, so a gradient's staleness is the version at its arrival minus the version it was
    computed on.
    """

    def __init__(self, comm: MPI.Intracomm, roles: Roles, config: TrainConfig, params: np.ndarray, steps: int):
        self.comm, self.roles, self.config, self.steps = comm, roles, config, steps
        self.params = params
        self.grads = np.zeros_like(params)
        self.optimizer = make_optimizer(config, self.params, self.grads)
        self.version = 0
        self.pulled = [0] * roles.n_workers
        self.stats = ServerStats([0] * roles.n_workers)

    def serve(self) -> ServerStats:
        """Answer workers until every gradient of the run is applied. Point-to-point with every worker."""
        if self.config.ps_mode == "async":
            self.serve_each()
        else:
            self.serve_by_step(self.config.staleness)
        return self.stats

    def reply(self, worker: int, stop: bool) -> None:
        """Send θ[a:b] to `worker`, which has already posted its receive, so this Send cannot hang."""
        self.comm.Send(self.params, dest=worker, tag=TAG_STOP if stop else TAG_PARAMS)
        self.pulled[worker] = self.version

    def probe(self) -> tuple[MPI.Message, int]:
        """The next gradient from any worker, matched but not yet received, and its sender."""
        status = MPI.Status()
        message = self.comm.Mprobe(MPI.ANY_SOURCE, TAG_GRAD, status)
        return message, status.Get_source()

    def learning_rate(self, step: int) -> float:
        return schedule(self.config.schedule, self.config.lr, step, self.steps, self.config.warmup_steps)

    def serve_by_step(self, bound: int) -> None:
        """sync / stale-synchronous: update c = sum of every worker's c-th gradient; worker w's answer
        waits until w, about to compute its gradient pushes[w], is at most `bound` updates ahead."""
        workers, steps = self.roles.n_workers, self.steps
        # Sums of steps whose gradients are still coming in: at most bound + 1 of them, and only as
        # many as the workers' spread needs; a finished sum's buffer is reused.
        open_sums: dict[int, list] = {}  # step -> [sum of the gradients in so far, how many]
        spare = [self.grads]
        incoming = np.empty_like(self.grads)
        pushes = [0] * workers
        for worker in range(workers):
            self.reply(worker, stop=steps == 0)
        waiting = []
        while self.version < steps:
            message, worker = self.probe()
            step = pushes[worker]
            entry = open_sums.get(step)
            if entry is None:
                entry = open_sums[step] = [spare.pop() if spare else np.empty_like(self.grads), 0]
            target = entry[0] if entry[1] == 0 else incoming
            message.Recv(target)
            staleness = step - self.pulled[worker]
            if self.config.staleness_lr and staleness:
                target *= 1.0 / (1 + staleness)
            if target is incoming:
                entry[0] += incoming
            entry[1] += 1
            self.stats.record(worker, staleness)
            pushes[worker] += 1
            if entry[1] == workers:  # the last gradient of step `version` is in
                del open_sums[step]
                self.optimizer.grads = entry[0]
                self.optimizer.step(self.learning_rate(self.version))
                self.version += 1
                spare.append(entry[0])
            waiting.append(worker)
            waiting = [w for w in waiting if not self._release(w, pushes[w], bound)]

    def _release(self, worker: int, pushed: int, bound: int) -> bool:
        """Answer a waiting worker if it may go on (or, after its last step, once every update is in)."""
        last = pushed == self.steps
        may_go = self.version == self.steps if last else pushed - self.version <= bound
        if may_go:
            self.reply(worker, stop=last)
        return may_go

    def serve_each(self) -> None:
        """async: apply each gradient on arrival and answer its worker at once. Server 0 grants the
        steps x W gradients of the run one at a time; the others follow its count."""
        workers = self.roles.n_workers
        budget = self.steps * workers
        grants_server = self.roles.server_index == 0
        for worker in range(workers):
            self.reply(worker, stop=budget == 0)
        granted = workers if budget else 0
        for applied in range(budget):
            message, worker = self.probe()
            message.Recv(self.grads)
            staleness = self.version - self.pulled[worker]
            self.stats.record(worker, staleness)
            lr = self.learning_rate(applied // workers)
            self.optimizer.step(lr / (1 + staleness) if self.config.staleness_lr else lr)
            self.version += 1
            stop = granted == budget
            if not stop:
                granted += 1
            self.reply(worker, stop=stop and grants_server)


# ---------------------------------------------------------------------------- the worker


class Worker:
    """A worker's setup: its backend, rows, batches and whole model, and the Stage that runs its
    forward and backward (the step code of every layout, with one stage and one micro-batch)."""

    def __init__(self, config: TrainConfig, widths: list[int], comm: MPI.Intracomm):
        self.config = config
        self.backend = backend = select_backend(config.device, comm)
        if config.data is None:
            config.data = ensure_synthetic(config, widths, comm)
        self.dataset = open_dataset(config, widths, comm)
        self.data = load_rank_data(self.dataset, config, widths[-1], comm)
        self.batches = Batches(self.data, self.dataset, backend, config)
        xp = backend.xp
        self.model = Model(widths, config.activation, xp, config.dtype, config.seed)
        self.stage = Stage(self.model, StageLink(MPI.COMM_SELF, xp), make_loss(config.loss, xp), [("F", 0), ("B", 0)],
                           1, first_stage=True, last_stage=True)
        self.val_x = xp.asarray(self.data.val_x, dtype=np.dtype(config.dtype))
        self.val_y = xp.asarray(self.data.val_y, dtype=self.batches.label_dtype)

    def evaluate(self, comm: MPI.Intracomm) -> dict:
        """Validation over every worker's rows of comm under the θ each holds. Collective on comm."""
        totals = self.stage.evaluate(self.val_x, self.val_y, True)
        comm.Allreduce(MPI.IN_PLACE, totals, op=MPI.SUM)
        return validation_metrics(totals, self.config)


def work(worker: Worker, link: WorkerLink, config: TrainConfig, report: Reporter) -> list[dict]:
    """Compute and push gradients of this worker's batches, epoch after epoch, until told to stop.

    Returns one entry per epoch this worker began: gradients pushed, samples, loss sum, seconds, and
    validation of its own rows under the θ it holds at the epoch's end (no message to other workers).
    """
    scale = 1.0 / config.batch_size
    epochs, epoch = [], 0
    go = link.pull()
    while go:
        started, loss_sum, pushes, samples = time.perf_counter(), 0.0, 0, 0
        for x, y in worker.batches.epoch(epoch, worker.data.steps_per_epoch):
            loss_sum += worker.stage.forward_backward(x, y, scale)
            go = link.push_pull()
            pushes += 1
            samples += len(x)
            report.advance()
            if not go:
                break
        seconds = time.perf_counter() - started
        val = worker.evaluate(MPI.COMM_SELF)
        epochs.append({"pushes": pushes, "samples": samples, "loss_sum": loss_sum, "seconds": seconds,
                       "val": val, "val_rows": len(worker.val_x)})
        epoch += 1
    return epochs


# ---------------------------------------------------------------------------- reporting


def epoch_records(per_worker: list[list[dict]], final_val: dict, world: int) -> list[dict]:
    """One record per epoch, summed over the workers that reached it; `step` counts updates of a
    global batch (gradients / W); the last record's validation is that of the final θ."""
    n_workers, records, pushed = len(per_worker), [], 0
    for e in range(max(len(epochs) for epochs in per_worker)):
        entries = [epochs[e] for epochs in per_worker if len(epochs) > e]
        pushed += sum(entry["pushes"] for entry in entries)
        samples = sum(entry["samples"] for entry in entries)
        seconds = max(entry["seconds"] for entry in entries)
        record = {"epoch": e + 1, "step": pushed // n_workers,
                  "loss": sum(entry["loss_sum"] for entry in entries) / max(samples, 1),
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


# ---------------------------------------------------------------------------- the run


def run(config: TrainConfig, comm: MPI.Intracomm) -> TrainResult:
    """Train under `config` with workers and parameter servers on the ranks of comm; every rank
    returns the same result, whose last history record holds the servers' counts. Collective."""
    check_config(config, comm.size)
    widths = parse_widths(config.model)
    n_params = sum(int(np.prod(shape)) for shape in full_shapes(widths).values())
    roles = Roles(comm.rank, comm.size - config.servers, tuple(chunk_bounds(n_params, config.servers)))
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
    steps = comm.bcast(worker.data.steps_per_epoch if comm.rank == 0 else None, root=0)
    steps = config.steps if config.steps is not None else config.epochs * steps
    schedule(config.schedule, config.lr, 0, steps, config.warmup_steps)  # a bad warm-up fails here, everywhere

    # Servers build the model on the host from the same seed, so their θ starts as the workers' does.
    model = worker.model if worker else Model(widths, config.activation, np, config.dtype, config.seed)
    if config.init_from:
        init_from(config.init_from, param_pieces(model), widths, comm)
    report = Reporter(config, comm.size, steps, comm.rank == 0)
    agree(comm, error_of(report.start, worker.backend if worker else CPU, threads))
    report.say(describe(config, roles))

    if roles.is_server:
        a, b = roles.bounds[roles.server_index]
        outcome = Server(ps, roles, config, model.params[a:b], steps).serve()
        theta = model.params
    else:
        link = WorkerLink(ps, roles, model)
        outcome = work(worker, link, config, report)
        theta = link.params
    share_parameters(ps, roles, theta)

    final_val = {}
    if not roles.is_server:
        if not link.on_host:
            model.params.set(theta)
        final_val = worker.evaluate(workers)
        worker.dataset.close()
        workers.Free()
    outcomes = ps.gather(outcome, root=0)
    records = None
    if comm.rank == 0:
        records = epoch_records(outcomes[:roles.n_workers], final_val, comm.size)
        if records:
            records[-1].update(server_summary(config, outcomes[roles.n_workers:]))
    for record in ps.bcast(records, root=0):
        report.epoch(record)
    check_drained(ps)
    ps.Free()

    result = TrainResult(model.state(), report.history)
    report.finish(result)
    return result
