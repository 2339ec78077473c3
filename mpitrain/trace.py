"""A timeline of one run: compute, every message and every wait of every rank, in one Chrome/Perfetto
trace (Trace Event Format). Open the file in https://ui.perfetto.dev or chrome://tracing.

    mpirun -n 4 mpitrain train --tp 2 --pp 2 --micro-batches 4 --trace run.json --trace-steps 10:12
    MPITRAIN_TRACE=run.json mpirun -n 2 mpitrain train
    mpitrain trace-summary run.json

One process per rank (pid = world rank), one track (tid) per kind of work (KINDS). Spans are
complete events ("ph": "X", ts and dur in microseconds of rank 0's clock); a point-to-point message
is also a flow arrow ("ph": "s" at the send, "ph": "f" at the receive, same id) from sender to
receiver. Message spans carry the bytes that the metrics count for the same exchange (comm/traffic.py
for the collectives, StageLink and TensorGroup their own), so a trace adds up to the metrics.

How: each rank appends plain tuples to a bounded list (MAX_EVENTS, then it counts what it drops);
at start-up a ping-pong with rank 0 estimates each rank's clock offset (midpoint of the fastest of
PINGS round trips); at the end rank 0 gathers the lists, shifts them to its clock and writes the
file. At an abort each rank writes what it has to FILE.rank<r>.json instead (best effort).

Zero cost when off: a call site tests `TRACE.active`, one attribute, and does nothing else.
"""

import json
import os
import time
import zlib

from mpi4py import MPI

from mpitrain.comm.failure import BEFORE_ABORT, agree
from mpitrain.comm.fingerprint import world_ranks
from mpitrain.errors import MpitrainError
from mpitrain.outputs import atomic_write

# Track ids, in the order Perfetto shows them.
KINDS = {"step": 1, "data": 2, "compute": 3, "gradient all-reduce": 4, "parameter all-gather": 5,
         "tensor-parallel": 6, "pipeline": 7, "parameter server": 8, "optimizer": 9, "checkpoint": 10, "wait": 11}
MAX_EVENTS = int(os.environ.get("MPITRAIN_TRACE_MAX_EVENTS", "1000000"))
PINGS = 8
_TAG_PING = 151


def trace_path(config) -> str | None:
    """Where this run writes its trace: --trace, else $MPITRAIN_TRACE, else nowhere."""
    return config.trace or os.environ.get("MPITRAIN_TRACE") or None


def parse_steps(spec: str | None) -> tuple[int, int] | None:
    """'A:B' -> (A, B): trace steps A..B-1, counted from 0 as the metrics' step counter; None: all."""
    if spec is None:
        return None
    first, _, last = spec.partition(":")
    if not (first.strip().isdecimal() and last.strip().isdecimal() and int(first) < int(last)):
        raise MpitrainError(f"--trace-steps '{spec}': expected A:B with 0 <= A < B, like 10:20")
    return int(first), int(last)


class Tracer:
    """This rank's event buffer. Call sites test `active` first; the rest is only called when on."""

    def __init__(self):
        self.active = False
        self.path: str | None = None
        self.window: tuple[int, int] | None = None
        self.recording = False
        self.step: int | None = None
        self.events: list[tuple] = []
        self.dropped = 0
        self.offset = 0.0
        self.rank = 0
        self._sequence: dict[tuple, int] = {}

    now = staticmethod(time.perf_counter)

    # ------------------------------------------------------------------------ start and steps

    def start(self, path: str, steps: str | None, comm: MPI.Intracomm) -> None:
        """Start buffering events of this run (collective on comm: the clock ping-pong)."""
        self.path, self.window = path, parse_steps(steps)
        self.rank = MPI.COMM_WORLD.rank
        self.events, self.dropped, self._sequence = [], 0, {}
        self.offset = align_clock(comm)
        self.active = True
        self.set_step(None)

    def set_step(self, step: int | None) -> None:
        """The step now running (None outside steps: start-up, validation). Events are kept for
        steps in the window, and outside steps only when no window was given."""
        self.step = step
        if self.window is None:
            self.recording = self.active
        else:
            self.recording = self.active and step is not None and self.window[0] <= step < self.window[1]

    # ------------------------------------------------------------------------ events

    def span(self, kind: str, name: str, start: float, end: float | None = None, **args) -> None:
        """A complete event on the track of `kind` from start to end (perf_counter seconds)."""
        if not self.recording:
            return
        if len(self.events) >= MAX_EVENTS:
            self.dropped += 1
            return
        args["step"] = self.step
        self.events.append(("X", KINDS[kind], name, start, (self.now() if end is None else end) - start, args))

    def flow(self, out: bool, kind: str, channel: str, sender: int, receiver: int, tag: int, at: float) -> int:
        """One end of the arrow of a message from world rank sender to receiver with tag on a channel
        ("pp", "ps"). Both ends count the messages of their (channel, sender, receiver, tag), which
        MPI delivers in order, so they agree on the id without exchanging it."""
        key = (channel, sender, receiver, tag)
        seq = self._sequence.get(key, 0)
        self._sequence[key] = seq + 1
        flow_id = ((zlib.crc32(repr(key).encode()) << 21) + seq) % (1 << 53)
        if self.recording and len(self.events) < MAX_EVENTS:
            self.events.append(("s" if out else "f", KINDS[kind], f"{channel} message", at, flow_id, None))
        return flow_id

    def message(self, out: bool, kind: str, channel: str, comm: MPI.Intracomm, peer: int, tag: int, name: str,
                started: float, nbytes: int, **args) -> None:
        """A point-to-point message with rank peer of comm: its span from started to now (a receive's is
        its wait; bytes counts sent bytes only, as the metrics do) and its end of the arrow, mid-span
        so that the arrow binds to the span."""
        ended = self.now()
        self.span(kind, name, started, ended, peer=peer, tag=tag, bytes=nbytes if out else 0,
                  received_bytes=0 if out else nbytes, **args)
        self.arrow(out, kind, channel, comm, peer, tag, (started + ended) / 2)

    def arrow(self, out: bool, kind: str, channel: str, comm: MPI.Intracomm, peer: int, tag: int, at: float) -> None:
        """flow() between this rank and rank peer of comm."""
        ranks = world_ranks(comm)
        sender, receiver = (comm.rank, peer) if out else (peer, comm.rank)
        self.flow(out, kind, channel, ranks[sender], ranks[receiver], tag, at)

    # ------------------------------------------------------------------------ the file

    def finish(self, comm: MPI.Intracomm) -> None:
        """Gather every rank's events on rank 0 and write the trace; every rank returns once it is
        written, or raises the same MpitrainError. Collective on comm."""
        if not self.active:
            return
        self.active = self.recording = False
        mine = (self.rank, self.offset, self.events, self.dropped)
        ranks = comm.gather(mine, root=0)
        self.events, error = [], None
        if comm.rank == 0:
            try:
                write(self.path, ranks)
            except OSError as exc:
                error = MpitrainError(f"--trace {self.path}: {exc.strerror}")
        agree(comm, error)

    def dump_local(self) -> None:
        """This rank's events alone, to PATH.rank<r>.json: the best an abort allows. A part that cannot
        be written is given up: the error that stopped the run is the one to report."""
        if self.active and self.path:
            self.active = self.recording = False
            try:
                write(f"{self.path}.rank{self.rank}.json", [(self.rank, self.offset, self.events, self.dropped)])
            except (MpitrainError, OSError):
                pass


TRACE = Tracer()
BEFORE_ABORT.append(TRACE.dump_local)


def align_clock(comm: MPI.Intracomm) -> float:
    """Seconds to add to this rank's perf_counter to read rank 0's. Collective on comm.

    Rank r sends its time t0, rank 0 answers its time t1, r reads t2: t1 - (t0 + t2) / 2, from the
    fastest of PINGS round trips (the one least delayed by anything else)."""
    best = (float("inf"), 0.0)
    for peer in range(1, comm.size):
        for _ in range(PINGS):
            if comm.rank == 0:
                comm.recv(source=peer, tag=_TAG_PING)
                comm.send(time.perf_counter(), dest=peer, tag=_TAG_PING)
            elif comm.rank == peer:
                t0 = time.perf_counter()
                comm.send(t0, dest=0, tag=_TAG_PING)
                t1 = comm.recv(source=0, tag=_TAG_PING)
                t2 = time.perf_counter()
                best = min(best, (t2 - t0, t1 - (t0 + t2) / 2))
    return best[1] if comm.rank else 0.0


def write(path: str, ranks: list[tuple]) -> None:
    """The Trace Event Format file of [(world rank, clock offset, events, dropped)], one process per rank."""
    events, dropped = [], {}
    names = {tid: kind for kind, tid in KINDS.items()}
    for rank, offset, buffered, lost in ranks:
        dropped[rank] = lost
        events.append({"ph": "M", "name": "process_name", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
        for tid, kind in names.items():
            events.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": tid, "args": {"name": kind}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": rank, "tid": tid, "args": {"sort_index": tid}})
        for phase, tid, name, start, extra, args in buffered:
            ts = round((start + offset) * 1e6, 3)
            if phase == "X":
                events.append({"ph": "X", "pid": rank, "tid": tid, "name": name, "cat": names[tid], "ts": ts,
                               "dur": round(extra * 1e6, 3), "args": args})
            else:
                flow = {"ph": phase, "pid": rank, "tid": tid, "name": name, "cat": "message", "ts": ts, "id": extra}
                if phase == "f":
                    flow["bp"] = "e"  # bind to the span that encloses the receive
                events.append(flow)
    document = {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"producer": "mpitrain", "dropped_events": dropped}}
    atomic_write(path, lambda handle: handle.write(json.dumps(document).encode()), binary=True)
