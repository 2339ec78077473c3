"""Collective-mismatch detection: before each library collective and each matched send/receive,
ranks exchange a small fingerprint of the call and stop the job at the first disagreement.

    fingerprint.enable()          # or `mpitrain train --check-collectives`, or MPITRAIN_CHECK_COLLECTIVES=1
    allreduce(buf, comm)          # now checked: every rank must call allreduce(float32 x n, same algorithm)

A fingerprint is (operation, algorithm, dtype, length, tag, communicator, call site `file:line`).
Ranks compare all of it but the call site, which is only named in the report (ranks are world ranks):

    mpitrain: collective mismatch: rank 0 calls allreduce(float32 x 812,042, ring) at buckets.py:98 but
    rank 1 calls allreduce(float32 x 1,024, ring) at job.py:140

Without the check such a mismatch is silent garbage (hier, rd), an exception on one rank and a hang
on the others (ring), or a truncation error far from its cause. The fingerprints travel on a
shadow communicator (one Dup of COMM_WORLD, made when the checks are enabled), so they can never
match the library's or the user's own messages, ANY_TAG receives included.

Collectives: each rank sends its fingerprint to its right neighbour and compares the one from its
left neighbour; if any two ranks disagree, some neighbouring pair does, so some rank sees it.
A rank that waits `missing_s` seconds (MPITRAIN_CHECK_WAIT_S, default 30) for its neighbour's fingerprint reports a missing participant
(the neighbour is in another call, on another communicator, or gone). Point-to-point: the sender
sends the fingerprint of its send just before the data; the receiver compares it with its receive.

On a mismatch the detecting rank prints one line and aborts every rank (exit EXIT_MISMATCH) within
a second (comm.failure.abort). The cost is one small message and one poll per call (see README, "Checking
collectives"); when off, a call site pays one attribute test.
"""

import os
import sys
import time
import zlib

import numpy as np
from mpi4py import MPI

EXIT_MISMATCH = 3
FINGERPRINT_BYTES = 192
# Point-to-point fingerprints carry their message's tag; collectives use one above any the library sends.
TAG_COLLECTIVE = 32767


def _site(depth: int) -> str:
    """`file:line` of the frame `depth` levels above the caller of this function."""
    frame = sys._getframe(depth + 1)
    # A schedule checks itself when first advanced: name who advances it, not ring.complete.
    while frame.f_back is not None and frame.f_code.co_name == "complete":
        frame = frame.f_back
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"


def _group_id(world_ranks: tuple[int, ...]) -> int:
    """A number naming a communicator's ranks, equal on all of them."""
    return zlib.crc32(np.asarray(world_ranks, dtype=np.int64).tobytes())


def encode(operation: str, algorithm: str, dtype, length: int, tag, site: str, group: int = 0) -> np.ndarray:
    """The fixed-size byte record of one call (the call site is cut to fit)."""
    tag = "" if tag is None or tag == MPI.ANY_TAG else tag
    text = f"{operation}|{algorithm}|{np.dtype(dtype).name}|{length}|{tag}|{group}|{site}"
    raw = text.encode()[:FINGERPRINT_BYTES]
    record = np.zeros(FINGERPRINT_BYTES, dtype=np.uint8)
    record[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return record


def decode(record: np.ndarray) -> dict:
    operation, algorithm, dtype, length, tag, group, site = (
        bytes(record).rstrip(b"\0").decode(errors="replace").split("|", 6))
    return {"operation": operation, "algorithm": algorithm, "dtype": dtype, "length": int(length),
            "tag": tag, "group": int(group), "site": site}


def describe(fp: dict) -> str:
    """'allreduce(float32 x 1,024, ring) at buckets.py:88'."""
    extras = [fp["algorithm"]] if fp["algorithm"] else []
    if fp["tag"]:
        extras.append(f"tag {fp['tag']}")
    inner = ", ".join([f"{fp['dtype']} x {fp['length']:,}"] + extras)
    return f"{fp['operation']}({inner}) at {fp['site']}"


def _same(a: dict, b: dict) -> bool:
    return all(a[key] == b[key] for key in ("operation", "algorithm", "dtype", "length", "tag", "group"))


def world_ranks(comm: MPI.Intracomm) -> tuple[int, ...]:
    """COMM_WORLD rank of each rank of comm (cached on comm: a local lookup, not a collective)."""
    ranks = comm.Get_attr(_KEYVAL)
    if ranks is None:
        ranks = tuple(MPI.Group.Translate_ranks(comm.Get_group(), list(range(comm.size)), MPI.COMM_WORLD.Get_group()))
        comm.Set_attr(_KEYVAL, ranks)
    return ranks


_KEYVAL = MPI.Comm.Create_keyval()


class _Shadow:
    """A Dup of COMM_WORLD that carries the fingerprints of every checked communicator, and the
    fingerprint sends in flight. One for all communicators, made when the checks are enabled (a
    collective step every rank takes alike): made on first use of each communicator it would be a
    collective that a missing participant never joins."""

    def __init__(self):
        self.comm = MPI.COMM_WORLD.Dup()
        self.sends: list = []

    def send(self, record: np.ndarray, dest: int, tag: int) -> None:
        while self.sends and self.sends[0][0].Test():
            self.sends.pop(0)
        self.sends.append((self.comm.Isend(record, dest, tag), record))


class Checker:
    """The process's collective checker; call sites test `CHECK.active` before calling it."""

    def __init__(self):
        self.active = False
        self.missing_s = float(os.environ.get("MPITRAIN_CHECK_WAIT_S", "30"))
        self.calls = 0
        self._shadow: _Shadow | None = None

    def enable(self, on: bool = True) -> None:
        if on and self._shadow is None:
            self._shadow = _Shadow()
        self.active = on

    def collective(self, comm: MPI.Intracomm, operation: str, algorithm: str, buf, depth: int = 1) -> None:
        """Check that every rank of comm enters the same collective (operation, algorithm, buf's dtype
        and length, and the same communicator). Collective on comm; the caller `depth` frames above
        the caller of this method is named as the call site."""
        if comm.size == 1:
            return
        self.calls += 1
        ranks = world_ranks(comm)
        mine = encode(operation, algorithm, buf.dtype, buf.size, None, _site(depth + 1), _group_id(ranks))
        left, right = ranks[(comm.rank - 1) % comm.size], ranks[(comm.rank + 1) % comm.size]
        theirs = np.empty_like(mine)
        receive = self._shadow.comm.Irecv(theirs, left, TAG_COLLECTIVE)
        self._shadow.send(mine, right, TAG_COLLECTIVE)
        self._wait(receive, left, mine, "has not joined it")
        if not _same(decode(mine), decode(theirs)):
            # With two ranks both see the same pair: only the lower reports, the other waits to be stopped.
            self._mismatch(left, mine, theirs, report=not (comm.size == 2 and comm.rank == 1))

    def send(self, comm: MPI.Intracomm, buf, dest: int, tag: int, depth: int = 1) -> None:
        """Announce a send of buf to rank dest of comm with tag (before the data, so they stay paired)."""
        self.calls += 1
        record = encode("send", "", buf.dtype, buf.size, tag, _site(depth + 1))
        self._shadow.send(record, world_ranks(comm)[dest], tag)

    def recv(self, comm: MPI.Intracomm, buf, source: int, tag: int, depth: int = 1) -> None:
        """Check that the next send from rank source of comm with tag (any: MPI.ANY_TAG) fits a receive
        into buf (dtype, length). After missing_s, a send with another tag from source is named."""
        self.calls += 1
        peer = world_ranks(comm)[source]
        mine = encode("recv", "", buf.dtype, buf.size, tag, _site(depth + 1))
        theirs = np.empty_like(mine)
        receive = self._shadow.comm.Irecv(theirs, peer, tag)
        self._wait(receive, peer, mine, "sends nothing with this tag", probe_tag=True)
        fp, other = decode(mine), decode(theirs)
        if (fp["dtype"], fp["length"]) != (other["dtype"], other["length"]):
            self._mismatch(peer, mine, theirs)

    def _wait(self, receive, peer: int, mine: np.ndarray, absent: str, probe_tag: bool = False) -> None:
        """Wait for world rank peer's fingerprint; after missing_s, report what it did instead."""
        deadline, pause = time.monotonic() + self.missing_s, 0.0
        shadow = self._shadow.comm
        while not receive.Test():
            if time.monotonic() > deadline:
                status = MPI.Status()
                if probe_tag and shadow.Iprobe(peer, MPI.ANY_TAG, status) and status.Get_tag() != TAG_COLLECTIVE:
                    other = np.empty_like(mine)
                    shadow.Recv(other, peer, status.Get_tag())
                    self._mismatch(peer, mine, other)
                self._stop(f"rank {shadow.rank} calls {describe(decode(mine))} but rank {peer} {absent} "
                           f"within {self.missing_s:g} s")
            time.sleep(pause)
            pause = min(1e-3, pause + 1e-5)

    def _mismatch(self, peer: int, mine: np.ndarray, theirs: np.ndarray, report: bool = True) -> None:
        (first, a), (second, b) = sorted([(self._shadow.comm.rank, decode(mine)), (peer, decode(theirs))],
                                         key=lambda side: side[0])
        line = f"rank {first} calls {describe(a)} but rank {second} calls {describe(b)}"
        if a["group"] != b["group"]:
            line += " (on different communicators)"
        if not report:
            time.sleep(2.0)  # the reporting rank aborts the job first; this is the fallback
        self._stop(line)

    def _stop(self, line: str) -> None:
        from mpitrain.comm.failure import abort

        abort(f"mpitrain: collective mismatch: {line}", EXIT_MISMATCH)


CHECK = Checker()


def enable(on: bool = True) -> None:
    """Turn the checks on (or off). Collective on COMM_WORLD the first time: every rank enables them alike."""
    CHECK.enable(on)


if os.environ.get("MPITRAIN_CHECK_COLLECTIVES", "") not in ("", "0"):
    enable()
