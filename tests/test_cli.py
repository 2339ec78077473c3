"""Bad input gives one clear line naming the problem, on every rank alike, and a non-zero exit."""

import os
import time

import h5py
import numpy as np
import pytest

from harness import mpitrain_argv, run_on_root
from mpitrain.cli import HANDLERS, make_parser, run
from mpitrain.data import synth
from mpitrain.errors import MpitrainError


def make_file(comm, folder, name, **datasets):
    """An HDF5 file written by rank 0 with the given datasets, visible to every rank."""
    path = os.path.join(folder, name)
    if comm.rank == 0:
        with h5py.File(path, "w") as handle:
            for key, value in datasets.items():
                handle[key] = value
    comm.Barrier()
    return path


def good_arrays(rows=64, features=8, classes=3):
    x, y = synth.make_classification(rows, features, classes, seed=0)
    return x, y


def expect_error(argv, pattern):
    base = ["train", "--no-progress", "--device", "cpu", "--model", "8-4-3", "--batch-size", "8", "--steps", "1"]
    with pytest.raises(MpitrainError, match=pattern):
        run(base + argv)


def test_missing_file(comm, shared_dir):
    expect_error(["--data", os.path.join(shared_dir, "nope.h5")], "nope.h5.*(not found|does not exist|no such)")


def test_corrupt_file(comm, shared_dir):
    path = os.path.join(shared_dir, "corrupt.h5")
    if comm.rank == 0:
        with open(path, "wb") as handle:
            handle.write(np.random.default_rng(0).bytes(4096))
    comm.Barrier()
    expect_error(["--data", path], "corrupt.h5")


def test_missing_x(comm, shared_dir):
    x, y = good_arrays()
    expect_error(["--data", make_file(comm, shared_dir, "nox.h5", y=y)], "nox.h5.*'x'")


def test_missing_y(comm, shared_dir):
    x, y = good_arrays()
    expect_error(["--data", make_file(comm, shared_dir, "noy.h5", x=x)], "noy.h5.*'y'")


def test_lengths_differ(comm, shared_dir):
    x, y = good_arrays()
    expect_error(["--data", make_file(comm, shared_dir, "len.h5", x=x, y=y[:-1])], "len.h5.*(64|63)")


def test_non_numeric_dtype(comm, shared_dir):
    x, y = good_arrays()
    labels = np.array([str(v).encode() for v in y])
    expect_error(["--data", make_file(comm, shared_dir, "str.h5", x=x, y=labels)], "str.h5.*'y'.*(numeric|dtype)")


def test_feature_count_differs_from_model(comm, shared_dir):
    x, y = good_arrays(features=9)
    expect_error(["--data", make_file(comm, shared_dir, "feat.h5", x=x, y=y)], "9 features.*8-4-3")


def test_label_outside_classes(comm, shared_dir):
    x, y = good_arrays()
    y = y.copy()
    y[-1] = 7
    expect_error(["--data", make_file(comm, shared_dir, "label.h5", x=x, y=y)], r"label 7.*\[0, 3\)")


def test_too_few_samples_for_the_batch(comm, shared_dir):
    x, y = good_arrays(rows=12)
    path = make_file(comm, shared_dir, "few.h5", x=x, y=y)
    with pytest.raises(MpitrainError, match="fewer than one global batch"):
        run(["train", "--no-progress", "--device", "cpu", "--model", "8-4-3", "--batch-size", "64", "--data", path])


def test_batch_smaller_than_world(comm, shared_dir):
    if comm.size == 1:
        pytest.skip("needs a world of 2 or more")
    x, y = good_arrays()
    path = make_file(comm, shared_dir, "world.h5", x=x, y=y)
    with pytest.raises(MpitrainError, match=f"smaller than the {comm.size} data-parallel groups"):
        run(["train", "--no-progress", "--device", "cpu", "--model", "8-4-3", "--batch-size", "1", "--data", path])


@pytest.mark.parametrize("spec", ["784-x-10", "784", "0-10", "", "784--10"])
def test_malformed_model(spec):
    with pytest.raises(MpitrainError, match="--model"):
        run(["train", "--model", spec])


def test_unknown_flag_value():
    with pytest.raises(MpitrainError, match="--optimizer.*'rmsprop'"):
        run(["train", "--optimizer", "rmsprop"])


def test_unknown_flag():
    with pytest.raises(MpitrainError, match="--learning-rate"):
        run(["train", "--learning-rate", "3"])


def test_malformed_toml(comm, shared_dir):
    path = os.path.join(shared_dir, "bad.toml")
    if comm.rank == 0:
        with open(path, "w") as handle:
            handle.write("lr = = 3\n")
    comm.Barrier()
    with pytest.raises(MpitrainError, match="bad.toml.*malformed TOML"):
        run(["train", "--config", path])


def test_toml_values_and_flag_precedence(comm, shared_dir):
    from mpitrain.cli import make_parser, train_config

    path = os.path.join(shared_dir, "run.toml")
    if comm.rank == 0:
        with open(path, "w") as handle:
            handle.write('[train]\nbatch-size = 256\nlr = 0.5\noptimizer = "sgd"\n')
    comm.Barrier()
    settings = train_config(make_parser().parse_args(["train", "--config", path, "--lr", "0.25"]))
    assert (settings.batch_size, settings.lr, settings.optimizer) == (256, 0.25, "sgd")


def test_error_is_one_line_printed_once_with_exit_2(comm, shared_dir):
    """Under mpirun, a missing file prints exactly one `mpitrain: error:` line and exits 2."""
    missing = os.path.join(shared_dir, "absent.h5")
    done = run_on_root(comm, mpitrain_argv(2, "train", "--device", "cpu", "--data", missing), timeout=60)
    lines = [line for line in (done["stdout"] + done["stderr"]).splitlines() if line.strip()]
    assert done["returncode"] == 2, done
    assert lines == [line for line in lines if "absent.h5" in line] and len(lines) == 1, lines
    assert lines[0].startswith("mpitrain: error: ")


def test_a_rank_that_raises_ends_the_job(comm):
    """One rank raising while the other waits in a barrier ends the whole job, non-zero, within seconds."""
    script = (
        "from mpi4py import MPI\n"
        "from mpitrain.comm import install_abort_handler\n"
        "install_abort_handler()\n"
        "if MPI.COMM_WORLD.rank == 1:\n"
        "    raise RuntimeError('rank one fails on purpose')\n"
        "MPI.COMM_WORLD.Barrier()\n"
    )
    argv = mpitrain_argv(2, "x")
    argv = argv[: argv.index("-m")] + ["-c", script]
    started = time.monotonic()
    done = run_on_root(comm, argv, timeout=60)
    elapsed = time.monotonic() - started
    assert done["returncode"] not in (0, None), done
    assert "rank one fails on purpose" in done["stderr"]
    assert "[rank 1]" in done["stderr"]
    assert elapsed < 20


def test_nan_in_inputs(comm, shared_dir):
    x, y = good_arrays()
    x = x.copy()
    x[5, 2] = np.nan
    expect_error(["--data", make_file(comm, shared_dir, "nan.h5", x=x, y=y)], "nan.h5.*'x' holds NaN or Inf")


def test_every_subcommand_has_exactly_one_handler():
    """dispatch runs one handler per command (a command without one would fall through to training,
    as trace-summary once did): the parser's commands and the handlers are the same set."""
    commands = next(action for action in make_parser()._actions if action.dest == "command")
    assert set(commands.choices) == set(HANDLERS)


def test_trace_summary_top_and_plan_out_are_checked():
    with pytest.raises(MpitrainError, match="--top: expected a whole number >= 0, got '-1'"):
        run(["trace-summary", "run.json", "--top", "-1"])
    with pytest.raises(MpitrainError, match="--out p.json: it names where --calibrate writes a profile"):
        run(["plan", "--model", "8-4-2", "--ranks", "2", "--out", "p.json"])


def test_error_feedback_can_be_switched_off_on_the_command_line(comm):
    """A resumed run takes its checkpoint's settings, so a stored --error-feedback needs a flag that
    turns it off: --no-error-feedback sets False (given, so it overrides what is stored)."""
    from mpitrain.cli import train_config

    parse = make_parser().parse_args
    assert parse(["train", "--grad-dtype", "float16", "--no-error-feedback"]).error_feedback is False
    assert parse(["train"]).error_feedback is None  # not given: the stored or default value stands
    on = train_config(parse(["train", "--grad-dtype", "float16", "--error-feedback"]))
    assert on.error_feedback is True
