"""Failure handling that never hangs: agree on errors collectively, abort the world otherwise.

A user error seen by every rank (a bad flag, a missing file) is raised on every rank alike and
printed once. An error seen by one rank only (its shard is corrupt, it hit a bug) cannot be
agreed on without risking a hang in the next collective, so that rank aborts the whole job.
"""

import sys
import time
import traceback

from mpi4py import MPI

from mpitrain.errors import MpitrainError

ABORT_GRACE_S = 0.2


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


def abort(message: str, status: int = 1) -> None:
    """Print `message` from this rank and end every rank of the job with `status`."""
    print(message, file=sys.stderr, flush=True)
    from mpitrain.trace import TRACE

    TRACE.dump_local()  # best effort: this rank's part of the timeline, since no gather can follow
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
