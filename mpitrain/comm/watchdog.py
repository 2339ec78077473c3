"""A watchdog that turns a communication hang into a report and an abort.

`watch(comm, watchdog)` returns the same communicator (same handle, isinstance Intracomm) whose
blocking calls record what they wait in: operation, peers, tags, bytes, and the training step.
A daemon thread looks at that record a few times per timeout; when one call has waited longer
than the timeout it prints the record, gives the other ranks a moment to print theirs (their
watchdogs expire at about the same time, since they wait in the same broken exchange), then
aborts the job. mpi4py releases the GIL inside MPI calls, so the thread runs while the main
thread is blocked; the normal path pays one tuple and one clock read per call.

Watched: the blocking point-to-point calls (Mprobe included) and collectives of the communicator,
every communicator created from it (Dup, Split, Split_type, Create: each is watched in turn, so the
tensor, pipeline, data-parallel and parameter-server groups are), and the Waitall of the library's
non-blocking exchanges (they report themselves through `waiting`).
"""

import faulthandler
import inspect
import sys
import threading
import time
from contextlib import contextmanager

from mpi4py import MPI

EXIT_COMM_TIMEOUT = 124  # what `timeout` returns: the job ran out of time waiting
GRACE_S = 2.0

_BLOCKING = (
    "Send", "Ssend", "Recv", "Sendrecv", "Sendrecv_replace", "Probe",
    "Barrier", "Bcast", "Reduce", "Allreduce", "Gather", "Gatherv", "Allgather", "Allgatherv",
    "Scatter", "Scatterv", "Alltoall", "Alltoallv", "Reduce_scatter", "Reduce_scatter_block", "Scan", "Exscan",
    "Mprobe", "send", "ssend", "recv", "sendrecv", "probe", "mprobe", "barrier", "bcast", "reduce", "allreduce",
    "gather", "allgather", "scatter", "alltoall", "scan", "exscan",
    "Dup", "Split", "Split_type", "Create", "Create_group",
)
# Calls that make a communicator: mpi4py keeps the subclass for Dup but returns a plain Intracomm
# from the others, which would leave every group made from a watched communicator unwatched.
_MAKERS = ("Dup", "Split", "Split_type", "Create", "Create_group")


class Watchdog:
    """Aborts every rank when this rank waits in one watched call for more than `timeout` seconds."""

    def __init__(self, timeout: float, rank: int, grace: float = GRACE_S):
        self.timeout, self.rank, self.grace = timeout, rank, grace
        self.step: int | None = None
        self.current: tuple | None = None  # (operation, args, kwargs, communicator size, started)
        self._stopped = threading.Event()
        _running.append(self)
        self._thread = threading.Thread(target=self._run, name="mpitrain-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self in _running:
            _running.remove(self)

    def _run(self) -> None:
        poll = min(1.0, self.timeout / 4)
        while not self._stopped.wait(poll):
            current = self.current
            if current is not None and time.monotonic() - current[-1] > self.timeout:
                self._expire(current)
                return

    def _expire(self, current: tuple) -> None:
        operation, args, kwargs, size, started = current
        where = f" step {self.step}:" if self.step is not None else ""
        what = operation if args is None else describe(operation, args, kwargs, size)
        print(f"mpitrain: comm timeout: [rank {self.rank}]{where} waited {time.monotonic() - started:.1f} s in "
              f"{what}; aborting all ranks (--comm-timeout {self.timeout:g})",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)  # where this rank's threads are
        # The first rank to abort ends everyone; waiting a little lets the other stuck ranks say
        # where they are, which is what tells a mismatched collective from a slow peer.
        time.sleep(self.grace)
        MPI.COMM_WORLD.Abort(EXIT_COMM_TIMEOUT)


_running: list[Watchdog] = []


@contextmanager
def waiting(what: str):
    """Record, for a running watchdog, that this rank blocks in `what` (e.g. a collective's Waitall)."""
    if not _running:
        yield
        return
    dog = _running[-1]
    dog.current = (what, None, None, None, time.monotonic())
    try:
        yield
    finally:
        dog.current = None


def describe(operation: str, args: tuple, kwargs: dict, size: int) -> str:
    """'Sendrecv (to rank 1 tag 101, from rank 1 tag 101, 1.6 MB)' from a call's arguments."""
    try:
        bound = inspect.signature(getattr(MPI.Intracomm, operation)).bind(None, *args, **kwargs)
    except (TypeError, ValueError):
        return operation
    bound.apply_defaults()
    given = bound.arguments
    parts = []
    for peer, tag, word in (("dest", "tag", "to"), ("dest", "sendtag", "to"), ("source", "tag", "from"),
                            ("source", "recvtag", "from")):
        if peer in given and tag in given:
            parts.append(f"{word} {_rank(given[peer])} tag {_tag(given[tag])}")
    if "root" in given:
        parts.append(f"root {given['root']}")
    if not parts:
        parts.append(f"all {size} ranks")
    sizes = [_nbytes(given.get(name)) for name in ("buf", "sendbuf", "recvbuf")]
    nbytes = next((n for n in sizes if n is not None), None)
    parts.append(_size(nbytes) if nbytes is not None else "Python object")
    return f"{operation} ({', '.join(parts)})"


def _rank(value) -> str:
    return "any rank" if value == MPI.ANY_SOURCE else f"rank {value}"


def _tag(value) -> str:
    return "any" if value == MPI.ANY_TAG else str(value)


def _nbytes(buffer) -> int | None:
    if buffer is None or buffer is MPI.IN_PLACE:
        return None
    if isinstance(buffer, (list, tuple)) and buffer:
        buffer = buffer[0]
    return getattr(buffer, "nbytes", None)


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


class _Watched:
    """Mixin: each blocking call records itself in the class's watchdog while it waits."""

    _watchdog: Watchdog


def _watched(operation: str):
    base = getattr(MPI.Intracomm, operation)

    def call(self, *args, **kwargs):
        dog = self._watchdog
        dog.current = (operation, args, kwargs, self.Get_size(), time.monotonic())
        try:
            result = base(self, *args, **kwargs)
        finally:
            dog.current = None
        if operation in _MAKERS and result != MPI.COMM_NULL and not isinstance(result, _Watched):
            result = type(self)(result)
        return result

    call.__name__ = call.__qualname__ = operation
    call.__doc__ = base.__doc__
    return call


for _operation in _BLOCKING:
    setattr(_Watched, _operation, _watched(_operation))


def watch(comm: MPI.Intracomm, watchdog: Watchdog) -> MPI.Intracomm:
    """`comm` (the same handle, not a duplicate) with every blocking call watched by `watchdog`.

    Never Free the result: the handle still belongs to whoever owns `comm`.
    """
    watched = type(f"Watched{type(comm).__name__}", (_Watched, type(comm)), {"_watchdog": watchdog})
    return watched(comm)
