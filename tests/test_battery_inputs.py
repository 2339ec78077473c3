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


# ---------------------------------------------------------------------------- kind 2: every flag's invalid range

# (flag, invalid value, text the one line must hold): every numeric flag outside its range.
INVALID_FLAGS = [
    ("--seed", "-1", "--seed -1"), ("--seed", str(2**63), "--seed"),
    ("--batch-size", "0", "--batch-size 0"), ("--epochs", "0", "--epochs 0"), ("--steps", "-1", "--steps -1"),
    ("--lr", "-0.1", "--lr -0.1"), ("--lr", "nan", "--lr nan"), ("--momentum", "1", "--momentum 1"),
    ("--momentum", "-1", "--momentum -1"), ("--weight-decay", "inf", "--weight-decay inf"),
    ("--warmup-steps", "-1", "--warmup-steps -1"), ("--val-fraction", "1", "--val-fraction 1"),
    ("--val-fraction", "-0.1", "--val-fraction -0.1"), ("--synth-samples", "0", "--synth-samples 0"),
    ("--tp", "0", "--tp 0"), ("--pp", "0", "--pp 0"), ("--micro-batches", "0", "--micro-batches 0"),
    ("--servers", "0", "--servers 0"), ("--staleness", "-1", "--staleness -1"), ("--threads", "0", "--threads 0"),
    ("--bucket-mb", "0", "--bucket-mb 0"), ("--keep-checkpoints", "0", "--keep-checkpoints 0"),
    ("--comm-timeout", "0", "--comm-timeout 0"), ("--comm-timeout", "nan", "--comm-timeout nan"),
    ("--max-memory", "lots", "--max-memory 'lots'"), ("--max-memory", "0", "--max-memory '0'"),
    ("--model", "8--3", "--model '8--3'"), ("--model", "8-0-3", "--model '8-0-3'"), ("--zero", "3", "--zero 3"),
]


@pytest.mark.parametrize("flag, value, named", INVALID_FLAGS)
def test_every_flag_out_of_range_is_one_line(comm, flag, value, named):
    from mpitrain.cli import make_parser, train_config
    from mpitrain.nn.model import parse_widths

    args = make_parser().parse_args(["train", f"{flag}={value}"])
    with pytest.raises(MpitrainError) as caught:
        parse_widths(train_config(args).model)
    assert named in str(caught.value) and "\n" not in str(caught.value)


def test_seed_minus_one_exits_2_in_a_job(comm, shared_dir):
    done = run_on_root(comm, mpitrain_argv(2, "train", *SMALL, "--steps", "2", "--seed", "-1"), timeout=60,
                       TMPDIR=shared_dir)
    assert done["returncode"] == 2 and "--seed -1" in one_error_line(done), done


# ---------------------------------------------------------------------------- kinds 1 and 2: checkpoints


def _checkpointed_run(comm, shared_dir, **overrides):
    """A 12-16-3 run that checkpoints at steps 4 and 8; its settings and folder."""
    import dataclasses

    from mpitrain.config import TrainConfig, validate
    from mpitrain.data import synth
    from harness import write_on_root
    from mpitrain.train import train

    x, y = synth.make_classification(480, 12, 3, seed=3)
    data = write_on_root(comm, os.path.join(shared_dir, "small.h5"), x, y)
    folder = os.path.join(shared_dir, "ck")
    settings = validate(dataclasses.replace(
        TrainConfig(), model="12-16-3", batch_size=36, device="cpu", progress=False, seed=5, data=data,
        checkpoint_dir=folder, checkpoint_every=4, steps=8, **overrides))
    train(settings, comm)
    return settings, folder


def _edit_checkpoint(path: str, edit_meta=None, edit_arrays=None) -> None:
    """Rewrite a checkpoint with edited metadata or arrays and a digest recomputed, as a careful
    editor would: the file verifies, only its contents are insane."""
    from mpitrain.checkpoint import load_checkpoint, save_checkpoint

    checkpoint = load_checkpoint(path)
    if edit_meta:
        edit_meta(checkpoint.meta)
    if edit_arrays:
        edit_arrays(checkpoint.arrays)
    save_checkpoint(path, checkpoint)


def _set(keys, value):
    def edit(meta):
        target = meta
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return edit


INVALID_FIELDS = [
    (("position",), -5, "'position' = -5"), (("epoch",), -3, "'epoch' = -3"), (("step",), -1, "'step' = -1"),
    (("optimizer", "t"), -1, "optimizer step 't' = -1"), (("world_size",), 0, "'world_size' = 0"),
    (("skipped_steps",), -2, "'skipped_steps' = -2"), (("skipped_steps",), 99, "'skipped_steps' = 99"),
    (("steps_per_epoch",), 0, "'steps_per_epoch' = 0"), (("position",), 10**6, "'position' = 1000000"),
    (("position",), "3", "'position' is missing or not a int"), (("step",), True, "'step' is missing"),
    (("optimizer",), [], "'optimizer' is missing"), (("config",), None, "'config' is missing"),
    (("residual",), "yes", "'residual' = \"yes\""),
]


@pytest.mark.parametrize("keys, value, named", INVALID_FIELDS)
def test_every_checkpoint_field_out_of_range_is_refused_naming_it(comm, shared_dir, keys, value, named):
    import dataclasses

    from mpitrain.checkpoint import checkpoint_name
    from mpitrain.train import train

    settings, folder = _checkpointed_run(comm, shared_dir)
    path = os.path.join(folder, checkpoint_name(8))
    if comm.rank == 0:
        _edit_checkpoint(path, _set(keys, value))
    comm.Barrier()
    with pytest.raises(MpitrainError, match="checkpoint field " + named.replace("(", r"\(")):
        train(dataclasses.replace(settings, resume=path, steps=12), comm)


def test_position_beyond_the_epoch_exits_2_not_loops(comm, shared_dir):
    from mpitrain.checkpoint import checkpoint_name

    settings, folder = _checkpointed_run(comm, shared_dir)
    path = os.path.join(folder, checkpoint_name(8))
    if comm.rank == 0:
        _edit_checkpoint(path, _set(("position",), 10**6))
    done = run_on_root(comm, mpitrain_argv(2, "train", "--data", settings.data, "--model", "12-16-3",
                                           "--batch-size", "36", "--device", "cpu", "--no-progress", "--seed", "5",
                                           "--steps", "12", "--checkpoint-dir", folder, "--resume", path),
                       timeout=60, TMPDIR=shared_dir)
    assert done["returncode"] == 2 and "'position' = 1000000" in one_error_line(done), done
    assert len(done["stdout"]) < 10_000


def test_rng_rows_for_fewer_ranks_than_the_world_are_refused(comm, shared_dir):
    import dataclasses

    from mpitrain.checkpoint import checkpoint_name
    from mpitrain.train import train

    settings, folder = _checkpointed_run(comm, shared_dir)
    path = os.path.join(folder, checkpoint_name(8))

    def drop_a_row(arrays):
        for name in [n for n in arrays if n.startswith("rng/")]:
            arrays[name] = arrays[name][:-1]

    if comm.rank == 0:
        _edit_checkpoint(path, edit_arrays=drop_a_row)
    comm.Barrier()
    with pytest.raises(MpitrainError, match=r"'rng/\w+' has shape \(%d," % (comm.size - 1)):
        train(dataclasses.replace(settings, resume=path, steps=12), comm)


def _plant_huge_dataset(path: str) -> None:
    """An extra (10^12, 784) chunked dataset, never written (a few kB on disk). Its digest is not
    recomputed (that would hash 3 TB of fill values): the loader must refuse the file on its layout
    before it hashes anything, whether the digest matches or not."""
    import h5py

    with h5py.File(path, "r+") as handle:
        handle.create_dataset("junk", shape=(10**12, 784), dtype="f4", chunks=(1024, 784))


def test_a_checkpoint_with_an_extra_huge_dataset_is_skipped_by_auto(comm, shared_dir, capfd):
    import dataclasses

    from mpitrain.checkpoint import checkpoint_name
    from mpitrain.train import train

    settings, folder = _checkpointed_run(comm, shared_dir)
    if comm.rank == 0:
        _plant_huge_dataset(os.path.join(folder, checkpoint_name(8)))
    comm.Barrier()
    capfd.readouterr()
    train(dataclasses.replace(settings, resume="auto", steps=12), comm)
    output = comm.bcast("".join(capfd.readouterr()), root=0)
    assert "unexpected dataset 'junk' (1000000000000, 784)" in output and "previous checkpoint" in output, output
    assert "resumed from" in output and "ckpt-00000004.h5" in output, output


# ---------------------------------------------------------------------------- kind 1: sizes


def test_a_model_too_large_for_memory_fails_before_allocating(comm, shared_dir):
    started = time.monotonic()
    done = run_on_root(comm, mpitrain_argv(2, "train", *SMALL[2:], "--model", "32-1000000000-5", "--steps", "2"),
                       timeout=60, TMPDIR=shared_dir)
    line = one_error_line(done)
    assert done["returncode"] == 2 and "--model 32-1000000000-5 needs about" in line and "parameters" in line, done
    assert "limit" in line and time.monotonic() - started < 30


@pytest.mark.parametrize("rows", [10**12, 10**9])
def test_a_data_file_declaring_more_rows_than_memory_fails_with_one_line(comm, shared_dir, rows):
    import h5py

    path = os.path.join(shared_dir, "declared.h5")
    if comm.rank == 0:
        with h5py.File(path, "w") as handle:
            handle.create_dataset("x", shape=(rows, 32), dtype="f4", chunks=(4096, 32))
            handle.create_dataset("y", shape=(rows,), dtype="i8", chunks=(4096,))
    done = run_on_root(comm, mpitrain_argv(2, "train", "--data", path, "--model", "32-8-5", "--batch-size", "32",
                                           "--device", "cpu", "--no-progress", "--steps", "2",
                                           "--max-memory", "2G"), timeout=60, TMPDIR=shared_dir)
    line = one_error_line(done)
    assert done["returncode"] == 2 and f"{rows} rows of 32 features needs about" in line, done
    assert "--max-memory 2G" in line


def test_max_memory_is_the_limit(comm, shared_dir):
    done = run_on_root(comm, mpitrain_argv(2, "train", *SMALL, "--steps", "2", "--max-memory", "8K"),
                       timeout=60, TMPDIR=shared_dir)
    assert done["returncode"] == 2 and "more than the limit of 8.0 KiB (--max-memory 8K)" in one_error_line(done)


def test_rng_layout_matches_what_a_checkpoint_writes():
    from mpitrain.checkpoint import RNG_ROWS
    from mpitrain.checkpoint import rng_arrays, rng_state

    written = rng_arrays([rng_state()] * 3)
    assert {name: (array.shape, array.dtype.kind) for name, array in written.items()} == \
        {name: ((3, *row), kind) for name, (row, kind) in RNG_ROWS.items()}


# ---------------------------------------------------------------------------- kind 11: one way to open HDF5


def test_init_from_a_data_file_names_what_is_missing(comm, shared_dir):
    from mpitrain.data import synth
    from harness import write_on_root

    x, y = synth.make_classification(200, 8, 3, seed=1)
    good = write_on_root(comm, os.path.join(shared_dir, "good.h5"), x, y)
    done = run_on_root(comm, mpitrain_argv(2, "train", "--data", good, "--init-from", good, "--model", "8-4-3",
                                           "--batch-size", "32", "--device", "cpu", "--no-progress", "--steps", "2"),
                       timeout=60, TMPDIR=shared_dir)
    line = one_error_line(done)
    assert done["returncode"] == 2 and "no dataset '0/weight'" in line and "locking" not in line, done


@pytest.mark.parametrize("flag", ["--init-from", "--resume"])
def test_a_missing_or_foreign_file_is_named(comm, shared_dir, flag):
    from mpitrain.cli import run

    folder = comm.bcast(shared_dir, root=0)
    text = os.path.join(folder, "notes.txt")
    if comm.rank == 0:
        with open(text, "w") as handle:
            handle.write("not hdf5")
    comm.Barrier()
    for path, named in ((os.path.join(folder, "absent.h5"), "file not found"), (text, "not a readable HDF5 file"),
                        (folder, "is a directory")):
        with pytest.raises(MpitrainError, match=named):
            run(["train", *SMALL, "--steps", "2", flag, path, "--checkpoint-dir", os.path.join(folder, "ck")])
