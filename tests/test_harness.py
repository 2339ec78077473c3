"""The test harness (tests/conftest.py) never hides an exception: a nested `mpirun -n 2 pytest` of a
small test file, where one rank raises while the other waits in a collective, prints the raising
rank's test id, rank and message within seconds and ends non-zero; the same for a fixture. A hang
prints the stacks of every rank before the per-test timeout ends the job."""

import os
import shutil
import sys
import time

from harness import run_on_root

HERE = os.path.dirname(__file__)
MESSAGE = "rank 1 gave up before the all-reduce"
NESTED = f'''
import time

import numpy as np
import pytest
from mpitrain.comm import allreduce


def test_one_rank_raises(comm):
    if comm.rank == 1:
        raise ValueError("{MESSAGE}")
    allreduce(np.ones(4), comm, "ring")


@pytest.fixture
def broken(comm):
    if comm.rank == 1:
        raise ValueError("fixture: {MESSAGE}")
    comm.bcast(None, root=1)


def test_fixture_raises(broken):
    pass


def test_hangs(comm):
    if comm.rank == 1:
        time.sleep(60)
    comm.bcast(None, root=1)
'''
TEST_TIMEOUT_S = 120  # the per-test timeout the report must not wait for
AGREE_S = 2


def run_nested(comm, tmp_path, test: str, timeout: float = TEST_TIMEOUT_S) -> tuple[dict, float]:
    folder = comm.bcast(str(tmp_path) if comm.rank == 0 else None, root=0)
    if comm.rank == 0:
        for name in ("conftest.py", "harness.py"):
            shutil.copy(os.path.join(HERE, name), folder)
        with open(os.path.join(folder, "test_nested.py"), "w") as handle:
            handle.write(NESTED)
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    argv = [mpirun, "-n", "2", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            f"--timeout={timeout:g}", "--rootdir", folder, f"{folder}/test_nested.py::{test}"]
    started = time.monotonic()
    done = run_on_root(comm, argv, timeout=60, MPITRAIN_TEST_AGREE_S=str(AGREE_S))
    return done, time.monotonic() - started


def test_exception_on_one_rank_is_printed_while_the_other_waits(comm, tmp_path):
    done, elapsed = run_nested(comm, tmp_path, "test_one_rank_raises")
    assert done["returncode"] not in (0, None), done
    assert "[rank 1] test_nested.py::test_one_rank_raises failed in call" in done["stderr"], done
    assert f"ValueError: {MESSAGE}" in done["stderr"], done
    assert elapsed < 10, f"took {elapsed:.1f} s"


def test_exception_in_a_fixture_is_printed_while_the_other_waits(comm, tmp_path):
    done, elapsed = run_nested(comm, tmp_path, "test_fixture_raises")
    assert done["returncode"] not in (0, None), done
    assert "[rank 1] test_nested.py::test_fixture_raises failed in setup" in done["stderr"], done
    assert f"ValueError: fixture: {MESSAGE}" in done["stderr"], done
    assert elapsed < 10, f"took {elapsed:.1f} s"


def test_a_hang_prints_the_stacks_of_every_rank(comm, tmp_path):
    # Long enough that the later rank's dump (its test may start a second or two after rank 0's on a
    # loaded machine) comes before the first rank's timeout ends the job.
    timeout = 10.0
    done, _ = run_nested(comm, tmp_path, "test_hangs", timeout)
    assert done["returncode"] not in (0, None), done
    dump_at = timeout - min(3.0, timeout / 4)
    for rank in (0, 1):
        assert f"[rank {rank}] test_nested.py::test_hangs still runs after {dump_at:g} s" in done["stderr"], done
    # Both ranks' dumps interleave in one stream, and the first rank's timeout may end the job
    # while the other's dump is still being written: at least one must show the hanging test.
    stacks = done["stderr"].split("still runs after")[1:]
    assert any('in test_hangs' in stack for stack in stacks), done
