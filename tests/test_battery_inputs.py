"""Issue 12's battery, input and layout kinds: sizes, numbers, MPMD starts, the watchdog in every
layout, config and tuning files, HDF5 opens. Every case expects one clean outcome: one line and
exit 2 for bad input, exit 124 for a stuck rank, never a traceback wall or a hang.

    python -m pytest -m battery                     # the whole battery (this file and the other)
    mpirun -n 2 python -m pytest tests/test_battery_inputs.py
"""

import json
import os
import signal
import sys
import time

import pytest

from harness import mpitrain_argv, run_on_root
from mpitrain.comm import thresholds
from mpitrain.comm.watchdog import EXIT_COMM_TIMEOUT
from mpitrain.config import load_toml
from mpitrain.errors import MpitrainError

pytestmark = pytest.mark.battery

FAULTS = os.path.join(os.path.dirname(__file__), "faults.py")
SMALL = ("--model", "8-16-3", "--synth-samples", "400", "--batch-size", "20", "--device", "cpu", "--no-progress")


def one_error_line(done: dict) -> str:
    """The job's single `mpitrain: error:` line, after checking there is exactly one and no traceback."""
    lines = [line for line in done["stderr"].splitlines() if line.startswith("mpitrain: error:")]
    assert len(lines) == 1 and "Traceback" not in done["stderr"], done
    return lines[0]


# ---------------------------------------------------------------------------- kind 6: MPMD starts


def mpmd_argv(first: list[str], second: list[str]) -> list[str]:
    """`mpirun -n 1 python -m mpitrain FIRST : -n 1 python -m mpitrain SECOND`."""
    launcher = mpitrain_argv(1, *first)
    return launcher + [":", "-n", "1", sys.executable, "-m", "mpitrain", *second]


@pytest.mark.parametrize("second", [["train", "--help"], ["--version"], ["train", "--seed", "x"],
                                    ["train", "--no-such-flag"]])
def test_a_rank_leaving_at_start_ends_every_rank(comm, shared_dir, second):
    train = ["train", *SMALL, "--steps", "20", "--comm-timeout", "5"]
    started = time.monotonic()
    done = run_on_root(comm, mpmd_argv(train, second), timeout=60, TMPDIR=shared_dir)
    elapsed = time.monotonic() - started
    assert done["returncode"] == 2, done
    line = one_error_line(done)
    assert "rank 1" in line or "rank(s) 1" in line, line
    assert elapsed < 10 + 5, f"took {elapsed:.1f} s"  # MPI start-up included


def test_help_on_every_rank_prints_once_and_exits_0(comm, shared_dir):
    done = run_on_root(comm, mpitrain_argv(2, "train", "--help"), timeout=60, TMPDIR=shared_dir)
    assert done["returncode"] == 0 and done["stdout"].count("usage: mpitrain train") == 1, done


# ---------------------------------------------------------------------------- kind 7: the watchdog in every layout

TIMEOUT_S = 2.0


def _release(stopped_file: str) -> None:
    """SIGCONT then SIGKILL the rank that stopped itself, if the job left it behind."""
    try:
        pid = int(open(stopped_file).read().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            if b"faults.py" not in handle.read():
                return  # that process ended and its pid went to another
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        pass


@pytest.mark.parametrize("layout, fault, rank, waits_in", [
    (("--tp", "2"), "stop", 1, "tensor-parallel"),
    (("--pp", "2"), "stop", 1, "rank 0"),
    (("--sync", "ps"), "stop", 0, "Mprobe"),
    (("--sync", "ps"), "stop-server", 1, "Waitall (worker's push and pull"),
    ((), "stop", 1, "rank 0"),
])
def test_comm_timeout_fires_when_a_rank_stops(comm, shared_dir, layout, fault, rank, waits_in):
    """One rank SIGSTOPs itself in step 5: the other must abort the job with exit 124 within the
    timeout plus 3 s of the stop, whatever communicator it waits on."""
    stopped = os.path.join(shared_dir, "stopped")
    argv = mpitrain_argv(2, "train", *SMALL, *layout, "--steps", "100000", "--comm-timeout", str(TIMEOUT_S))
    at = argv.index("-m")
    argv = argv[:at] + [FAULTS, fault, "5", str(rank), "--"] + argv[at + 2:]
    try:
        done = run_on_root(comm, argv, timeout=60, TMPDIR=shared_dir, FAULT_STOPPED_FILE=stopped)
        ended = comm.bcast(time.time(), root=0)
    finally:
        if comm.rank == 0:
            _release(stopped)
    assert done["returncode"] == EXIT_COMM_TIMEOUT, done
    stopped_at = comm.bcast(float(open(stopped).read().split()[1]) if comm.rank == 0 else None, root=0)
    reports = [line for line in done["stderr"].splitlines() if "comm timeout" in line]
    assert any(waits_in in line for line in reports), reports
    assert ended - stopped_at < TIMEOUT_S + 3, f"aborted {ended - stopped_at:.1f} s after the stop"


# ---------------------------------------------------------------------------- kind 9: TOML tables


def write_toml(folder: str, text: str) -> str:
    path = os.path.join(folder, "run.toml")
    with open(path, "w") as handle:
        handle.write(text)
    return path


def test_top_level_keys_and_a_train_table_are_both_read(tmp_path):
    values = load_toml(write_toml(tmp_path, "lr = 0.5\n[train]\nsteps = 10\n"))
    assert values == {"lr": 0.5, "steps": 10}


@pytest.mark.parametrize("text, named", [
    ("lr = 0.5\n[train]\nlr = 0.1\n", "lr is set twice"),
    ("batch-size = 8\nbatch_size = 16\n", "batch-size is set twice"),
    ("[train]\nstep = 10\n", "unknown key [train] 'step'"),
    ("[other]\nsteps = 10\n", "unknown key 'other'"),
    ("train = 3\n", "'train' must be a table"),
])
def test_a_setting_is_never_dropped_silently(tmp_path, text, named):
    with pytest.raises(MpitrainError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load_toml(write_toml(tmp_path, text))


def test_toml_lr_reaches_the_run(comm, shared_dir):
    path = write_toml(shared_dir, "lr = 0.5\n[train]\nsteps = 10\n") if comm.rank == 0 else None
    from mpitrain.cli import make_parser, train_config

    comm.Barrier()
    config = train_config(make_parser().parse_args(["train", "--config", comm.bcast(path, root=0)]))
    assert (config.lr, config.steps) == (0.5, 10)


# ---------------------------------------------------------------------------- kind 10: tuning files


@pytest.mark.parametrize("contents", [
    {"format": 1, "layouts": []},
    {"format": 1, "layouts": {"p2-n1": [[None, "mpi"]]}},
    {"format": 1, "layouts": {"p2-n1": {"measured": {}}}},
    {"format": 1, "layouts": {"p2-n1": {"thresholds": [[None, ["mpi"]]]}}},
    {"format": 1, "layouts": {"p2-n1": {"thresholds": [[True, "mpi"], [None, "ring"]]}}},
    {"format": 1, "layouts": {"p2-n1": {"thresholds": {"a": 1}}}},
    {"format": True, "layouts": {}},
    [1, 2],
])
def test_a_malformed_tuning_file_is_refused(tmp_path, contents):
    path = os.path.join(tmp_path, "tune.json")
    with open(path, "w") as handle:
        json.dump(contents, handle)
    with pytest.raises(MpitrainError, match="not an mpitrain tuning file"):
        thresholds.read_file(path)


def test_a_malformed_tuning_file_stops_train_with_one_line(comm, shared_dir):
    path = os.path.join(shared_dir, "tune.json")
    if comm.rank == 0:
        with open(path, "w") as handle:
            json.dump({"format": 1, "layouts": []}, handle)
    done = run_on_root(comm, mpitrain_argv(2, "train", *SMALL, "--steps", "2", "--allreduce", "auto"),
                       timeout=60, TMPDIR=shared_dir, MPITRAIN_TUNE_FILE=path)
    assert done["returncode"] == 2 and "not an mpitrain tuning file" in one_error_line(done), done
