"""Parameter-server training: S server ranks hold θ and the optimizer, the other ranks compute gradients.

    mpirun -n 4 mpitrain train --sync ps                             # 3 workers, 1 server, synchronous
    mpirun -n 4 mpitrain train --sync ps --ps-mode async             # each gradient applied on arrival
    mpirun -n 6 mpitrain train --sync ps --servers 2 --staleness 2   # stale-synchronous, 2 servers

Roles. Of P ranks, ranks 0..W-1 are workers and the last S are servers (W = P - S), so rank 0, which
reports, is a worker. The flat parameter buffer is cut into S contiguous ranges (`chunk_bounds`);
server s holds θ[a_s:b_s] and the optimizer state of that range. The workers form a communicator of
their own (a Split of the job) and set up their data exactly as data-parallel ranks do (data/rank.py).

Messages, point-to-point on a Dup of the job's communicator; every size is fixed by the ranges:
    TAG_GRAD+f  worker -> server s   ∇[a_s:b_s]   b_s - a_s values of --dtype; f = the worker's flags
                                                  (non-finite loss or gradient, signal, bad input row)
    TAG_PARAMS  server s -> worker   θ[a_s:b_s]   "compute another gradient"
    TAG_STOP    server s -> worker   θ[a_s:b_s]   "your last gradient of this segment is in: stop"
    TAG_LIMIT   server 0 -> server   one int64    "this segment ends early, at this count"
    TAG_SIGNAL  server -> server 0   empty        "I received SIGUSR1/SIGTERM" (once per run)
The run is served in segments (ps_train.py): between them every rank meets for checkpoints.
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

import sys
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from mpitrain.comm import agree
from mpitrain.comm.fingerprint import CHECK
from mpitrain.comm.watchdog import waiting
from mpitrain.trace import TRACE
from mpitrain.config import TrainConfig
from mpitrain.errors import MpitrainError
from mpitrain.nn.model import Model
from mpitrain.optim import make_optimizer, schedule

TAG_LIMIT = 60
TAG_SIGNAL = 61
TAG_PARAMS = 62
TAG_STOP = 63
# A gradient's tag carries its worker's flags: TAG_GRAD + (FLAG_NONFINITE | FLAG_SIGNAL | FLAG_BAD_INPUT).
TAG_GRAD = 64
FLAG_NONFINITE, FLAG_SIGNAL, FLAG_BAD_INPUT = 1, 2, 4


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

    def push_pull(self, flags: int = 0) -> bool:
        """Send ∇[a_s:b_s] to every server s, tagged with this step's flags (FLAG_*), and receive the
        θ[a_s:b_s] each answers with; True to go on."""
        if not self.on_host:
            self.model.grads.get(out=self.grads)
        return self._exchange(push=True, flags=flags)

    def _exchange(self, push: bool, flags: int = 0) -> bool:
        ranges = list(enumerate(self.roles.bounds))
        if TRACE.active:
            started = TRACE.now()
        # Receives first, so every answer lands in a posted buffer and a server's blocking Send returns.
        receive = [(self.params[a:b], self.roles.server_rank(s)) for s, (a, b) in ranges]
        requests = [] if CHECK.active else [self.comm.Irecv(buf, server, MPI.ANY_TAG) for buf, server in receive]
        if push:
            for s, (a, b) in ranges:
                if CHECK.active:
                    CHECK.send(self.comm, self.grads[a:b], self.roles.server_rank(s), TAG_GRAD + flags, depth=2)
                requests.append(self.comm.Isend(self.grads[a:b], self.roles.server_rank(s), TAG_GRAD + flags))
        if CHECK.active:  # each answer is checked before its receive is posted, after the pushes
            answers = []
            for buf, server in receive:
                CHECK.recv(self.comm, buf, server, MPI.ANY_TAG, depth=2)
                answers.append(self.comm.Irecv(buf, server, MPI.ANY_TAG))
            requests = answers + requests
        statuses = [MPI.Status() for _ in requests]
        # A stopped or vanished server leaves this wait unanswered: --comm-timeout must see it.
        with waiting(f"Waitall (worker's {'push and ' if push else ''}pull of θ from {len(ranges)} server(s))"):
            MPI.Request.Waitall(requests, statuses)
        if TRACE.active:
            self._trace(push, flags, started, statuses)
        if not self.on_host:
            self.model.params.set(self.params)
        return statuses[0].Get_tag() == TAG_PARAMS


    def _trace(self, push: bool, flags: int, started: float, statuses: list) -> None:
        """The exchange as one span; the arrows of its pushes and answers a quarter from either end."""
        ended = TRACE.now()
        pushed = self.grads.nbytes if push else 0
        TRACE.span("parameter server", "push ∇, pull θ" if push else "pull θ", started, ended, bytes=pushed)
        for s in range(len(self.roles.bounds)):
            server = self.roles.server_rank(s)
            if push:
                TRACE.arrow(True, "parameter server", "ps", self.comm, server, TAG_GRAD + flags, started + (ended - started) / 4)
            TRACE.arrow(False, "parameter server", "ps", self.comm, server, statuses[s].Get_tag(),
                        ended - (ended - started) / 4)


def share_parameters(comm: MPI.Intracomm, roles: Roles, theta: np.ndarray) -> None:
    """theta <- the servers' final θ on every rank: one Bcast of each server's range. Collective on comm."""
    for s, (a, b) in enumerate(roles.bounds):
        comm.Bcast(theta[a:b], root=roles.server_rank(s))


def check_drained(comm: MPI.Intracomm) -> None:
    """Fail loudly, on every rank, if a message of the run was never received: the protocol answers
    every message, so one left over would be a bug that a later run on the same communicator could
    trip over. Collective on comm."""
    status, error = MPI.Status(), None
    if comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG, status):
        error = MpitrainError(f"parameter server: rank {comm.rank} holds an unreceived message "
                              f"from rank {status.Get_source()} with tag {status.Get_tag()}")
    agree(comm, error)


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


@dataclass
class Stop:
    """Why server 0 ended a segment early, decided from a gradient's flags or its own signal flag."""

    reason: str  # "signal" | "nan" | "input"
    worker: int | None = None
    step: int | None = None


class Server:
    """θ[a:b] of one server, its optimizer, and the two serving loops, run segment by segment.

    `version` counts what has been applied to this range: updates (sync) or gradients (async);
    `pulled[w]` is the version worker w last received, so a gradient's staleness is the version at
    its arrival minus the version it was computed on. A segment ends at a step every rank knows in
    advance (a checkpoint step, the last step), or earlier at a limit server 0 chooses and sends to
    the other servers (TAG_LIMIT) when a gradient arrives flagged or its own signal flag is up.
    """

    def __init__(self, comm: MPI.Intracomm, roles: Roles, config: TrainConfig, params: np.ndarray, steps: int,
                 signalled=lambda: False, steps_per_epoch: int = 1):
        self.comm, self.roles, self.config, self.steps = comm, roles, config, steps
        self.steps_per_epoch = steps_per_epoch
        self.params = params
        self.grads = np.zeros_like(params)
        self.optimizer = make_optimizer(config, self.params, self.grads)
        # Sync mode's gradient slots (serve_by_step), kept across segments: one is allocated only
        # when every earlier one is held, so the count allocated is the most held at once.
        self.spare: list[np.ndarray] = []
        self.slots = 0
        self.version = 0
        self.pulled = [0] * roles.n_workers
        self.stats = ServerStats([0] * roles.n_workers)
        self.signalled = signalled
        self.skipped = 0
        self.stop: Stop | None = None
        self.leader = roles.server_index == 0
        self.peer_signal, self.signal_sent, self.signals_received = False, False, 0

    def serve(self, start: int, end: int) -> None:
        """Answer workers from global step `start` until step `end` (or server 0's earlier limit) is
        applied. Point-to-point with every worker and server."""
        self.stop = None
        if self.config.ps_mode == "async":
            self.serve_each(start, end)
        else:
            self.serve_by_step(start, end, self.config.staleness)

    @property
    def grad_bytes(self) -> int:
        """Bytes of the gradient buffers this server holds: the update's sum and the slots sync mode
        has allocated, (1 + slots) x (b - a) x itemsize; async mode receives into the sum itself."""
        return (1 + self.slots) * self.grads.nbytes

    @property
    def step(self) -> int:
        """Global steps applied: updates (sync), or gradients / W (async)."""
        return self.version // self.roles.n_workers if self.config.ps_mode == "async" else self.version

    def reply(self, worker: int, stop: bool) -> None:
        """Send θ[a:b] to `worker`, which has already posted its receive, so this Send cannot hang."""
        if CHECK.active:
            CHECK.send(self.comm, self.params, worker, TAG_STOP if stop else TAG_PARAMS)
        if TRACE.active:
            started = TRACE.now()
        self.comm.Send(self.params, dest=worker, tag=TAG_STOP if stop else TAG_PARAMS)
        if TRACE.active:
            TRACE.message(True, "parameter server", "ps", self.comm, worker, TAG_STOP if stop else TAG_PARAMS,
                          f"θ to worker {worker}", started, self.params.nbytes)
        self.pulled[worker] = self.version

    def probe(self) -> tuple[MPI.Message, int, int]:
        """The next message from a worker (a gradient) or from server 0 (a limit), matched but not
        yet received: (message, source, tag)."""
        status = MPI.Status()
        message = self.comm.Mprobe(MPI.ANY_SOURCE, MPI.ANY_TAG, status)
        return message, status.Get_source(), status.Get_tag()

    def learning_rate(self, step: int) -> float:
        config = self.config  # --schedule plateau is refused with --sync ps: nothing here rescales the rate
        return schedule(config.schedule, config.lr, step, self.steps, config.warmup_steps, min_lr=config.min_lr,
                        decay=config.lr_decay, steps_per_epoch=self.steps_per_epoch)

    def _receive_limit(self, message: MPI.Message) -> int:
        limit = np.empty(1, dtype=np.int64)
        message.Recv(limit)
        return int(limit[0])

    def _decide(self, flags: int, worker: int | None, step: int) -> bool:
        """Server 0: whether this gradient's flags (or a signal here or at another server) end the
        segment early; True the first time. A fault of the data or the arithmetic (a bad input row,
        a NaN under --on-nan abort) replaces an earlier signal stop: the run must not exit 75 and
        resume past it."""
        if not self.leader:
            return False
        first = self.stop is None
        if flags & FLAG_BAD_INPUT and (first or self.stop.reason == "signal"):
            self.stop = Stop("input", worker, step)
        elif flags & FLAG_NONFINITE and self.config.on_nan == "abort" and (first or self.stop.reason == "signal"):
            self.stop = Stop("nan", worker, step)
        elif first and (flags & FLAG_SIGNAL or self.signalled() or self.peer_signal):
            self.stop = Stop("signal", worker if flags & FLAG_SIGNAL else None, step)
        return first and self.stop is not None

    def _message(self, message: MPI.Message, source: int, tag: int) -> bool:
        """Handle a message between servers (a limit, a signal); False for a worker's gradient."""
        if tag == TAG_LIMIT:
            self.limit = self._receive_limit(message)
        elif tag == TAG_SIGNAL:
            message.Recv(np.empty(0, dtype=np.int64))
            self.peer_signal = True
            self.signals_received += 1
        else:
            return False
        return True

    def _forward_signal(self) -> None:
        """A server other than 0 that received SIGUSR1/SIGTERM tells server 0, once, which stops the
        segment for everyone; ps_train counts these messages so none is left unreceived."""
        if not self.leader and not self.signal_sent and self.signalled():
            self.comm.Send(np.empty(0, dtype=np.int64), dest=self.roles.server_rank(0), tag=TAG_SIGNAL)
            self.signal_sent = True

    def drain_signals(self, sent: int) -> None:
        """Server 0: receive the signal messages other servers sent that it has not yet received."""
        while self.signals_received < sent:
            self.comm.Recv(np.empty(0, dtype=np.int64), source=MPI.ANY_SOURCE, tag=TAG_SIGNAL)
            self.signals_received += 1
            self.peer_signal = True

    def _send_limit(self, limit: int) -> None:
        for s in range(1, len(self.roles.bounds)):
            self.comm.Send(np.array([limit], dtype=np.int64), dest=self.roles.server_rank(s), tag=TAG_LIMIT)

    def serve_by_step(self, start: int, end: int, bound: int) -> None:
        """sync / stale-synchronous: update c = sum of every worker's c-th gradient; worker w's answer
        waits until w, about to compute its gradient pushes[w], is at most `bound` updates ahead.
        An update with a non-finite gradient from any worker is skipped (--on-nan).

        Each worker's gradient lands in a slot of its own and a step's slots are added in worker
        order once all are in: the sum, and so the run, does not depend on arrival order. Slots are
        reused: W of them at bound 0 (a step holds all W until its last arrives), at most
        (bound + 1) x W otherwise; `slots` counts them."""
        workers = self.roles.n_workers
        self.limit = end
        open_steps: dict[int, list] = {}  # step -> [{worker: slot}, any non-finite]
        self.version = start
        self.pulled = [start] * workers
        pushes, allowed = [start] * workers, [start] * workers
        for worker in range(workers):
            self.reply(worker, stop=start == end)
            allowed[worker] = start + (start < end)
        held = []
        while self.version < self.limit:
            message, source, tag = self.probe()
            if not self._message(message, source, tag):
                worker, flags, step = source, tag - TAG_GRAD, pushes[source]
                entry = open_steps.setdefault(step, [{}, False])
                if not self.spare:
                    self.spare.append(np.empty_like(self.grads))
                    self.slots += 1
                slot = entry[0][worker] = self.spare.pop()
                if CHECK.active:
                    CHECK.recv(self.comm, slot, source, tag)
                started = TRACE.now() if TRACE.active else 0.0
                message.Recv(slot)
                if TRACE.active:
                    TRACE.message(False, "parameter server", "ps", self.comm, source, tag, f"∇ from worker {source}",
                                  started, slot.nbytes)
                staleness = step - self.pulled[worker]
                if self.config.staleness_lr and staleness:
                    slot *= 1.0 / (1 + staleness)
                entry[1] = entry[1] or bool(flags & FLAG_NONFINITE)
                self.stats.record(worker, staleness)
                pushes[worker] += 1
                if self._decide(flags, worker, step) and max(allowed) < self.limit:
                    # Every worker finishes the steps it was already allowed, and no more.
                    self.limit = max(allowed)
                    self._send_limit(self.limit)
                if len(entry[0]) == workers:  # the last gradient of step `version` is in
                    self._apply_step(open_steps.pop(step))
                held.append(worker)
            self._forward_signal()
            released = [w for w in held if self._release(w, pushes[w], bound)]
            held = [w for w in held if w not in released]
            for w in released:
                allowed[w] = pushes[w] + (pushes[w] < self.limit)

    def _apply_step(self, entry: list) -> None:
        slots, bad = entry
        if bad:
            self.skipped += 1
            self._warn(f"step {self.version + 1}: NaN or Inf in a worker's gradient: update skipped")
        else:
            np.copyto(self.grads, slots[0])
            for worker in range(1, self.roles.n_workers):
                self.grads += slots[worker]
            started = TRACE.now() if TRACE.active else 0.0
            self.optimizer.step(self.learning_rate(self.version))
            if TRACE.active:
                TRACE.span("optimizer", "update", started)
        self.version += 1
        self.spare.extend(slots.values())

    def _warn(self, line: str) -> None:
        # Server 0 alone knows when an update is skipped, so it says so (rank 0 is a worker).
        if self.leader:
            print(f"mpitrain: warning: {line} ({self.skipped} skipped so far)", file=sys.stderr, flush=True)

    def _release(self, worker: int, pushed: int, bound: int) -> bool:
        """Answer a waiting worker if it may go on (or, after its last step, once every update is in)."""
        last = pushed >= self.limit
        may_go = self.version >= self.limit if last else pushed - self.version <= bound
        if may_go:
            self.reply(worker, stop=last)
        return may_go

    def serve_each(self, start: int, end: int) -> None:
        """async: apply each gradient on arrival and answer its worker at once. Server 0 grants the
        segment's (end - start) x W gradients one at a time; the others follow its count. A
        non-finite gradient is dropped (--on-nan skip) without an update, but still counted."""
        workers = self.roles.n_workers
        self.version = start * workers
        budget = self.limit = end * workers
        for worker in range(workers):
            self.reply(worker, stop=budget == self.version)
        granted = min(self.version + workers, budget)
        while self.version < budget:
            message, source, tag = self.probe()
            if self._message(message, source, tag):
                budget = min(budget, self.limit) if tag == TAG_LIMIT else budget
                self._forward_signal()
                continue
            worker, flags, step = source, tag - TAG_GRAD, self.version // workers
            if CHECK.active:
                CHECK.recv(self.comm, self.grads, source, tag)
            started = TRACE.now() if TRACE.active else 0.0
            message.Recv(self.grads)
            if TRACE.active:
                TRACE.message(False, "parameter server", "ps", self.comm, source, tag, f"∇ from worker {source}",
                              started, self.grads.nbytes)
            staleness = self.version - self.pulled[worker]
            self.stats.record(worker, staleness)
            if flags & FLAG_NONFINITE:
                self.skipped += 1
                self._warn(f"gradient {self.version + 1}: NaN or Inf from worker {worker}: dropped")
            else:
                lr = self.learning_rate(self.version // workers)
                started = TRACE.now() if TRACE.active else 0.0
                self.optimizer.step(lr / (1 + staleness) if self.config.staleness_lr else lr)
                if TRACE.active:
                    TRACE.span("optimizer", "update", started)
            self.version += 1
            # Rounded up to whole steps: the run's step count stays gradients / W.
            if self._decide(flags, worker, step) and -(-granted // workers) * workers < budget:
                budget = -(-granted // workers) * workers
                self._send_limit(budget)
            stop = granted >= budget
            if not stop:
                granted += 1
            self.reply(worker, stop=stop and self.leader)
            self._forward_signal()
