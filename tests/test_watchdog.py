"""The watchdog: a mismatched collective is reported by every stuck rank and aborted within the
timeout plus a few seconds; a watched communicator otherwise behaves exactly like the plain one."""

import os
import time

import numpy as np
from mpi4py import MPI

from harness import mpitrain_argv, run_on_root
from mpitrain.comm.ring import ring_allreduce
from mpitrain.comm.watchdog import EXIT_COMM_TIMEOUT, Watchdog, describe, watch

FAULTS = os.path.join(os.path.dirname(__file__), "faults.py")
TIMEOUT_S = 2.0


def test_mismatched_allreduce_is_reported_and_aborted(comm, tmp_path):
    """Rank 1 skips step 3's gradient all-reduce: rank 0 waits in the gradient bucket's requests,
    rank 1 in the step agreement; both say where, with step, operation and size, and the job ends."""
    argv = mpitrain_argv(2, "train", "--model", "8-16-3", "--synth-samples", "400", "--batch-size", "20",
                         "--steps", "10", "--device", "cpu", "--no-progress", "--comm-timeout", str(TIMEOUT_S))
    at = argv.index("-m")
    argv = argv[:at] + [FAULTS, "skip-allreduce", "3", "1", "--"] + argv[at + 2:]
    started = time.monotonic()
    done = run_on_root(comm, argv, timeout=60, TMPDIR=comm.bcast(str(tmp_path), root=0))
    elapsed = time.monotonic() - started
    reports = [line for line in done["stderr"].splitlines() if "comm timeout" in line]
    assert done["returncode"] == EXIT_COMM_TIMEOUT, done
    assert any("[rank 0] step 3: waited" in line and "all-reduce of a" in line and "B gradient bucket over 2 ranks"
               in line for line in reports), reports
    flags = 3 * 8  # the step agreement's int64 flags: non-finite, signal, bad input row
    assert any("[rank 1] step 3: waited" in line and f"Allreduce (all 2 ranks, {flags} B)" in line
               for line in reports), reports
    assert elapsed < TIMEOUT_S + 10, f"took {elapsed:.1f} s"  # MPI start-up included


def test_watched_comm_is_the_same_communicator(comm):
    dog = Watchdog(timeout=60, rank=comm.rank)
    try:
        watched = watch(comm, dog)
        buf = np.arange(10, dtype=np.float64) + comm.rank
        expected = np.arange(10, dtype=np.float64) * comm.size + sum(range(comm.size))
        ring_allreduce(buf, watched)
        total = watched.allreduce(comm.rank)
        child = watched.Dup()
        child_size, child_is_watched = child.Get_size(), type(child) is type(watched)
        child.Free()
    finally:
        dog.stop()
    np.testing.assert_array_equal(buf, expected)
    assert total == sum(range(comm.size))
    assert isinstance(watched, MPI.Intracomm) and watched == comm
    assert child_size == comm.size and child_is_watched
    assert dog.current is None


def test_describe_names_operation_peers_tags_and_size():
    buf = np.zeros(1000, dtype=np.float32)
    assert describe("Sendrecv", (buf, 3, 101, buf, 2, 102), {}, 4) == \
        "Sendrecv (to rank 3 tag 101, from rank 2 tag 102, 4.0 kB)"
    assert describe("Recv", (buf,), {}, 4) == "Recv (from any rank tag any, 4.0 kB)"
    assert describe("Allreduce", (MPI.IN_PLACE, buf), {}, 4) == "Allreduce (all 4 ranks, 4.0 kB)"
    assert describe("Bcast", ([buf, MPI.FLOAT],), {"root": 2}, 4) == "Bcast (root 2, 4.0 kB)"
    assert describe("allgather", (7,), {}, 2) == "allgather (all 2 ranks, Python object)"
