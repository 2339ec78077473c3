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

from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from mpitrain.comm import agree
from mpitrain.comm.fingerprint import CHECK
from mpitrain.comm.watchdog import waiting
from mpitrain.trace import TRACE
from mpitrain.config import TrainConfig
from mpitrain.errors import MpitrainError
from mpitrain.nn.model import Model

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
