"""Make pytest safe under `mpirun -n N python -m pytest`.

- Every test phase ends with an agreement over all ranks: a failure on one rank fails the test
  on every rank, with that rank's message, so all ranks take the same path through the suite.
  The agreement never hides an exception: a rank whose phase failed (in the test or in a fixture)
  waits AGREE_S seconds at most for the others; if they are still stuck (waiting in a collective
  it left), it prints its test id, rank and exception and aborts the job.
- A test still running near its timeout prints the stacks of every thread on every rank first.
- The library's collective checks (comm/fingerprint.py) are on for the whole suite.
- Only rank 0 prints the report; the others stay quiet.
- A session that ends non-zero aborts the whole job at exit, so a rank that failed on its own
  (an import error, a collection error) cannot leave the others waiting in a collective.
"""

import faulthandler
import os
import sys
import threading
import time

import mpi4py.run
import numpy as np
import pytest
from mpi4py import MPI

from mpitrain.comm import fingerprint

_harness = MPI.COMM_WORLD.Dup()
fingerprint.enable()
AGREE_S = float(os.environ.get("MPITRAIN_TEST_AGREE_S", "5"))


@pytest.fixture
def shared_dir(comm, tmp_path):
    """A folder every rank can see: rank 0's tmp_path, broadcast."""
    return comm.bcast(str(tmp_path) if comm.rank == 0 else None, root=0)


@pytest.fixture
def small_classification(comm, shared_dir):
    """A 480-row, 12-feature, 3-class synthetic set written once by rank 0 (path on every rank)."""
    from harness import write_on_root
    from mpitrain.data import synth

    x, y = synth.make_classification(480, 12, 3, seed=3)
    return write_on_root(comm, os.path.join(shared_dir, "small.h5"), x, y)


@pytest.fixture
def comm():
    """A fresh clone of COMM_WORLD for one test, freed after it."""
    clone = MPI.COMM_WORLD.Dup()
    yield clone
    clone.Free()


def cupy_or_skip():
    """The cupy module, or a skip saying why the GPU backend cannot run here."""
    cupy = pytest.importorskip("cupy", reason="cupy is not installed")
    try:
        gpus = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:
        gpus = 0
    if gpus == 0:
        pytest.skip("cupy is installed but no CUDA device is visible")
    return cupy


@pytest.fixture(params=["numpy", "cupy"])
def xp(request):
    """Every test body runs on each array backend that is usable here."""
    return np if request.param == "numpy" else cupy_or_skip()


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    if _harness.rank != 0:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            config.pluginmanager.unregister(reporter)


def pytest_report_header(config):
    return f"mpi: world size {_harness.size}, {MPI.Get_library_version().splitlines()[0]}"


def _test_timeout(item) -> float | None:
    """The item's pytest-timeout seconds (marker, option or ini), or None."""
    try:
        import pytest_timeout

        return pytest_timeout._get_item_settings(item).timeout or None
    except (ImportError, AttributeError):
        return None


def _dump_stacks(config, nodeid: str, after: float) -> None:
    # Out of pytest's capture, which would otherwise keep the stacks with a report never written.
    with config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print(f"\n[rank {_harness.rank}] {nodeid} still runs after {after:g} s; stacks of this rank:",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Every rank prints its stacks a little before pytest-timeout ends the job: the timeout fires on
    the first rank only, and its exit takes the others down before they could say where they wait."""
    timeout = _test_timeout(item)
    timer = None
    if timeout:
        before = timeout - min(3.0, timeout / 4)
        timer = threading.Timer(before, _dump_stacks, (item.config, item.nodeid, before))
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()


def _arrive(item, report, failed: bool) -> None:
    """Wait until every rank has finished this phase. A rank whose phase failed waits AGREE_S at most:
    the others may be stuck in a collective it never joined, and only its message explains why."""
    arrived = _harness.Ibarrier()
    deadline = time.monotonic() + AGREE_S
    while not arrived.Test():
        if failed and time.monotonic() > deadline:
            print(f"\n[rank {_harness.rank}] {item.nodeid} failed in {report.when} while other ranks have not "
                  f"finished it after {AGREE_S:g} s (waiting in a collective this rank left?); aborting all "
                  f"ranks. Rank {_harness.rank}'s error:\n{report.longreprtext}", file=sys.stderr, flush=True)
            time.sleep(0.2)  # let mpirun forward the message before the abort tears the job down
            MPI.COMM_WORLD.Abort(1)
        time.sleep(0.001)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    summary = None
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        summary = (crash.message if crash else report.longreprtext.strip() or "failed")[:500]
    _arrive(item, report, summary is not None)
    failures = _harness.allgather(summary)
    failed_ranks = [rank for rank, text in enumerate(failures) if text is not None]
    if failed_ranks and not report.failed:
        first = failed_ranks[0]
        report.outcome = "failed"
        report.longrepr = f"failed on rank(s) {failed_ranks}; rank {first}: {failures[first]}"
    elif failed_ranks and _harness.size > 1:
        report.sections.append(("mpi", f"failed on rank(s) {failed_ranks}"))


def pytest_sessionfinish(session, exitstatus):
    if exitstatus != 0 and MPI.COMM_WORLD.size > 1:
        sys.stdout.flush()
        mpi4py.run.set_abort_status(int(exitstatus))
