"""The parameter server's side of parameter-server training (the protocol and the roles: ps.py).

    server = Server(comm, roles, config, theta[a:b], steps, ...)   # on each of the S server ranks
    server.serve(start, end)        # one segment: answer workers until steps start..end-1 are applied

Server s holds θ[a_s:b_s] and the optimizer state of that range in host memory, takes gradients
from any worker (Mprobe, then Mrecv into a slot of its own), applies them in sync, stale-synchronous
or async mode and answers each with exactly one θ message (ps.py's docstring gives the messages).
"""

import sys
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from mpitrain.comm.fingerprint import CHECK
from mpitrain.config import TrainConfig
from mpitrain.optim import make_optimizer, schedule
from mpitrain.parallel.ps import (FLAG_BAD_INPUT, FLAG_NONFINITE, FLAG_SIGNAL, TAG_GRAD, TAG_LIMIT, TAG_PARAMS,
                                  TAG_SIGNAL, TAG_STOP, Roles)
from mpitrain.trace import TRACE


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
