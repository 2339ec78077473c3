"""Failure handling that never hangs: agree on errors collectively, abort the world otherwise.

A user error seen by every rank (a bad flag, a missing file) is raised on every rank alike and
printed once. An error seen by one rank only (its shard is corrupt, it hit a bug) cannot be
agreed on without risking a hang in the next collective, so that rank aborts the whole job.
"""

import sys
import time
import traceback

import numpy as np
from mpi4py import MPI

from mpitrain.errors import MpitrainError

ABORT_GRACE_S = 0.2
# What a rank's command line asks for (agree_at_start), and how long the ranks wait for each other.
RUN, LEAVE, BAD = 0, 1, 2
START_DEADLINE_S = 5.0
EXIT_USAGE = 2


def agree(comm: MPI.Intracomm, error: MpitrainError | None) -> None:
    """Raise on every rank the error of the lowest rank that has one; collective on comm.

    Call it where ranks may disagree (each validated its own rows), before the next message
    they exchange, so no rank waits in a collective that a failed rank never joins.
    """
    failing = comm.allreduce(comm.rank if error is not None else comm.size, op=MPI.MIN)
    if failing == comm.size:
        return
    message = comm.bcast(str(error) if comm.rank == failing else None, root=failing)
    if error is not None and str(error) == message:
        raise error
    raise MpitrainError(message if comm.size == 1 else f"rank {failing}: {message}")


def agree_at_start(outcome: int, error: MpitrainError | None) -> None:
    """Return if every rank of the world will run; otherwise stop every rank alike. Collective on
    COMM_WORLD, the only communicator that exists yet.

    Under MPMD launches (`mpirun -n 1 mpitrain train ... : -n 1 mpitrain train --help`) ranks may
    be given different commands: a rank that left for --help or an argument error would leave the
    others waiting in the first collective (the world's Dup) forever. So every rank first says
    what it will do (RUN, LEAVE for --help/--version, BAD with `error`) in a non-blocking
    all-gather with a deadline. All LEAVE: exit 0. All BAD: raise `error`. Mixed: raise one
    MpitrainError naming the first rank that differs, on every rank. A rank that never answers
    (a program that is not mpitrain) ends the job by abort, exit 2.
    """
    world = MPI.COMM_WORLD
    outcomes = np.full(world.size, outcome, dtype=np.int32)
    if world.size > 1:
        request = world.Iallgather(np.array([outcome], dtype=np.int32), outcomes)
        deadline = time.monotonic() + START_DEADLINE_S
        while not request.Test():
            if time.monotonic() > deadline:
                abort(f"mpitrain: error: [rank {world.rank}] not every rank of the job started mpitrain within "
                      f"{START_DEADLINE_S:g} s: every rank must run the same command", EXIT_USAGE)
            time.sleep(0.005)
    if (outcomes == RUN).all():
        return
    if (outcomes == LEAVE).all():
        sys.exit(0)
    if (outcomes == BAD).all():
        raise error
    # Every rank is here, so a blocking broadcast from the first failing rank cannot hang.
    bad = np.flatnonzero(outcomes == BAD)
    if len(bad):
        first = int(bad[0])
        message = world.bcast(str(error) if world.rank == first else None, root=first)
        raise MpitrainError(f"rank {first}: {message} (the ranks of this job were given different commands)")
    leaving = ", ".join(map(str, np.flatnonzero(outcomes == LEAVE).tolist()))
    raise MpitrainError(f"rank(s) {leaving} asked for --help or --version but the others did not: "
                        "every rank of a job must be given the same command")


# Called before this rank aborts the job, best effort (the trace writes this rank's part of the
# timeline, since no gather can follow). Modules above this one register here, so this one
# imports none of them.
BEFORE_ABORT: list = []


def abort(message: str, status: int = 1) -> None:
    """Print `message` from this rank and end every rank of the job with `status`."""
    print(message, file=sys.stderr, flush=True)
    for hook in BEFORE_ABORT:
        try:
            hook()
        except Exception:  # noqa: BLE001 - the abort must happen whatever a hook does
            pass
    if MPI.COMM_WORLD.size > 1:
        # Hydra tears the job down as soon as Abort reaches it and sometimes drops output its proxy
        # has not yet forwarded (about 1 run in 30 lost the message): give the proxy a moment.
        time.sleep(ABORT_GRACE_S)
        MPI.COMM_WORLD.Abort(status)
    sys.exit(status)


def _abort_on_uncaught(kind, value, tb) -> None:
    rank = MPI.COMM_WORLD.rank
    text = "".join(traceback.format_exception(kind, value, tb))
    abort(f"[rank {rank}] uncaught exception, aborting all ranks:\n{text}", status=1)


def install_abort_handler() -> None:
    """Make any uncaught exception on any rank abort every rank, instead of hanging the others."""
    sys.excepthook = _abort_on_uncaught
