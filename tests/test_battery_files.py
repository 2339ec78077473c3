"""Issue 12's battery on the files mpitrain writes: output paths checked before step 1, write
errors as one line, checkpoint folders of another run, metrics after a resume.
(tests/test_battery_files_security.py: planted links, the synthetic cache, shared memory.)

    mpirun -n 2 python -m pytest -m battery

Full and read-only filesystems are small tmpfs mounts made here, so those cases need root; they
skip with that reason otherwise. Real jobs (exit status, kill -9) start `mpirun -n 2` from rank 0.
"""

import contextlib
import dataclasses
import json
import os
import time

import numpy as np
import pytest
from mpi4py import MPI

from battery_files_common import (CLASSES, FEATURES, config, fill, job_args, needs_root, on_root,
                                  read_only_folder, steps_taken, tmpfs, write_dataset)
from harness import mpitrain_argv, run_on_root
from mpitrain import outputs
from mpitrain.checkpoint import (Checkpoint, checkpoint_name, list_checkpoints, load_checkpoint,
                                 prune_checkpoints, save_checkpoint, save_parameters)
from mpitrain.cli import run as run_cli
from mpitrain.comm import tune
from mpitrain.data import synth, tools
from mpitrain.errors import MpitrainError
from mpitrain.train import train

pytestmark = pytest.mark.battery


@pytest.fixture
def dataset(comm, shared_dir):
    return write_dataset(comm, shared_dir)


# ---------------------------------------------------------------------------- 3. outputs checked before step 1


def place(comm, shared_dir, kind: str, name: str):
    """A path for an output in a bad place: (path, context manager that holds the place, reason pattern)."""
    if kind == "missing folder":
        return os.path.join(shared_dir, "no", "such", "dir", name), contextlib.nullcontext(), "does not exist"
    if kind == "under a regular file":
        on_root(comm, lambda: open(os.path.join(shared_dir, "plain"), "w").close())
        return os.path.join(shared_dir, "plain", name), contextlib.nullcontext(), "(is not a folder|Not a directory)"
    mount = os.path.join(shared_dir, "ro")
    return os.path.join(mount, name), read_only_folder(comm, mount), "Read-only file system"


BAD_PLACES = [(flag, kind) for flag in ("save", "metrics", "trace", "checkpoint_dir")
              for kind in ("missing folder", "under a regular file", "read-only mount")
              if (flag, kind) != ("checkpoint_dir", "missing folder")]  # a missing checkpoint folder is made


@pytest.mark.parametrize("flag,kind", [pytest.param(*case, marks=needs_root) if case[1] == "read-only mount" else case
                                       for case in BAD_PLACES])
def test_every_output_is_checked_before_step_1(comm, dataset, shared_dir, monkeypatch, flag, kind):
    """--save, --metrics, --trace and --checkpoint-dir in a missing folder, under a regular file or on a
    read-only mount: one error on every rank, and not one step trained."""
    path, holder, reason = place(comm, shared_dir, kind, "ck" if flag == "checkpoint_dir" else "out.h5")
    calls = steps_taken(monkeypatch)
    with holder:
        with pytest.raises(MpitrainError, match=f"cannot write.*{reason}") as caught:
            train(config(data=dataset, steps=300, **{flag: path}), comm)
    assert calls == []
    assert "\n" not in str(caught.value)


def test_a_trace_path_from_the_environment_is_checked_before_step_1(comm, dataset, shared_dir, monkeypatch):
    path, holder, reason = place(comm, shared_dir, "missing folder", "out.json")
    monkeypatch.setenv("MPITRAIN_TRACE", path)
    calls = steps_taken(monkeypatch)
    with holder:
        with pytest.raises(MpitrainError, match=f"--trace: cannot write.*{reason}"):
            train(config(data=dataset, steps=300), comm)
    assert calls == []


def test_save_naming_a_folder_is_refused_at_start(comm, dataset, shared_dir, monkeypatch):
    calls = steps_taken(monkeypatch)
    with pytest.raises(MpitrainError, match="cannot write .*: Is a directory"):
        train(config(data=dataset, steps=300, save=shared_dir), comm)
    assert calls == []


@pytest.mark.skipif(MPI.COMM_WORLD.size < 2, reason="the parameter server needs a worker and a server")
def test_parameter_server_checks_outputs_before_step_1(comm, dataset, shared_dir, monkeypatch):
    calls = steps_taken(monkeypatch)
    with pytest.raises(MpitrainError, match="--save: cannot write .*does not exist"):
        train(config(data=dataset, steps=300, sync="ps", save=os.path.join(shared_dir, "no", "m.h5")), comm)
    assert calls == []


def test_missing_save_folder_as_a_job_exits_2_at_once(comm, dataset, shared_dir):
    """The issue's example as a job: `--steps 300 --save no/such/dir/m.h5` stops before training."""
    target = os.path.join(shared_dir, "no", "such", "dir", "m.h5")
    run = run_on_root(comm, mpitrain_argv(2, *job_args(dataset, "--steps", "300", "--save", target)), timeout=90)
    assert run["returncode"] == 2, run
    assert run["stderr"].strip().splitlines() == [f"mpitrain: error: --save: cannot write {target}: folder "
                                                  f"{os.path.dirname(target)} does not exist"], run
    assert "epoch 1" not in run["stdout"]


@pytest.mark.parametrize("command", ["predict --out", "eval --metrics", "tune --out", "data synth --out"])
def test_other_commands_check_their_output_before_the_work(comm, dataset, shared_dir, command):
    if command.startswith("tune") and comm.size < 2:
        pytest.skip("tune needs two ranks")
    model = os.path.join(shared_dir, "m.h5")
    train(config(data=dataset, steps=0, save=model), comm)
    on_root(comm, lambda: open(os.path.join(shared_dir, "plain"), "w").close())
    bad = os.path.join(shared_dir, "plain", "out.h5")
    words = command.split()
    argv = {"predict": ["--model-file", model, "--data", dataset], "eval": ["--model-file", model, "--data", dataset],
            "tune": ["--max-mb", "64", "--trials", "50"], "data": ["--samples", "10", "--features", "2"]}[words[0]]
    started = time.monotonic()
    reason = "(folder .* is not a folder|Not a directory|File exists)"
    with pytest.raises(MpitrainError, match=f"cannot write {bad}: {reason}"):
        run_cli([*words[:-1], *argv, words[-1], bad])
    assert time.monotonic() - started < 10


# ---------------------------------------------------------------------------- 4. write errors: one line, exit 2


def good_file(path: str, writer: str = "parameters") -> bytes:
    """An earlier good output at path: a tuning file for the tuning writer, a parameter file otherwise."""
    if writer == "tuning file":
        with open(path, "w") as out:
            json.dump({"format": tune.FORMAT, "layouts": {}}, out)
    else:
        save_parameters(path, {"0/weight": np.arange(6.0).reshape(2, 3)})
    with open(path, "rb") as handle:
        return handle.read()


WRITERS = {
    "parameters": lambda path: save_parameters(path, {"w": np.zeros((64, 1024))}),
    "checkpoint": lambda path: save_checkpoint(path, Checkpoint({"step": 1}, {"model/w": np.zeros((64, 1024))})),
    "data synth": lambda path: synth.write_h5(path, np.zeros((512, 128), np.float32), np.zeros(512, np.int64)),
    "data tools": lambda path: tools.write_rows(path, np.zeros((512, 128), np.float32), np.zeros(512, np.int64)),
    "tuning file": lambda path: tune.save(path, "w2", [[None, "ring"]], [8] * 4096, {"ring": [1e-6] * 4096}),
    "text (eval --metrics, metrics rewrite)":
        lambda path: outputs.atomic_write(path, lambda out: out.write(b"0" * 500000), binary=True),
}


@needs_root
@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_on_a_full_filesystem_says_one_line_and_keeps_the_old_file(comm, shared_dir, writer):
    folder = os.path.join(shared_dir, "full")
    with tmpfs(comm, folder, "256k"):
        target = os.path.join(folder, "m.h5")
        before = on_root(comm, good_file, target, writer)
        on_root(comm, fill, folder)
        error = on_root(comm, lambda: str(pytest.raises(MpitrainError, WRITERS[writer], target).value))
        after = on_root(comm, lambda: open(target, "rb").read())
        left = on_root(comm, os.listdir, folder)
    assert error == f"cannot write {target}: No space left on device"
    assert after == before
    assert sorted(left) == ["filler", "m.h5"], "a temporary was left behind"


@needs_root
def test_read_only_mount_write_says_one_line(comm, shared_dir):
    folder = os.path.join(shared_dir, "ro")
    with read_only_folder(comm, folder):
        error = on_root(comm, lambda: str(pytest.raises(MpitrainError, WRITERS["parameters"],
                                                        os.path.join(folder, "m.h5")).value))
    assert error == f"cannot write {os.path.join(folder, 'm.h5')}: Read-only file system"


@needs_root
def test_full_filesystem_at_save_as_a_job_exits_2_with_one_line(comm, dataset, shared_dir):
    """The save fails at the end (an empty file still fits at start-up): exit 2, one line, the
    earlier good model untouched."""
    folder = os.path.join(shared_dir, "full")
    with tmpfs(comm, folder, "256k"):
        target = os.path.join(folder, "m.h5")
        before = on_root(comm, good_file, target)
        on_root(comm, fill, folder)
        run = run_on_root(comm, mpitrain_argv(2, *job_args(dataset, "--model", f"{FEATURES}-2000-{CLASSES}",
                                                           "--steps", "2", "--save", target)), timeout=90)
        after = on_root(comm, lambda: open(target, "rb").read())
    assert run["returncode"] == 2, run
    expected = f"mpitrain: error: cannot write {target}: No space left on device"
    assert run["stderr"].strip().splitlines() == [expected], run
    assert after == before


# ---------------------------------------------------------------------------- 5. reusing a checkpoint folder


def test_folder_of_another_run_is_refused_without_resume(comm, dataset, shared_dir, monkeypatch):
    folder = os.path.join(shared_dir, "ck")
    train(config(data=dataset, steps=30, checkpoint_dir=folder, checkpoint_every=10), comm)
    before = on_root(comm, list_checkpoints, folder)
    calls = steps_taken(monkeypatch)
    with pytest.raises(MpitrainError, match=r"--checkpoint-dir .*ck holds 3 checkpoint\(s\) of another run "
                                            r"\(newest ckpt-00000030.h5\): add --resume auto"):
        train(config(data=dataset, steps=30, lr=0.01, checkpoint_dir=folder, checkpoint_every=5), comm)
    assert calls == []
    assert on_root(comm, list_checkpoints, folder) == before


def test_resume_from_an_older_checkpoint_keeps_what_it_writes(comm, dataset, shared_dir):
    """A run continued from step 10 into a folder holding steps 10-30, keeping 2: each new
    checkpoint survives pruning although the older run's step numbers sort after it."""
    folder = os.path.join(shared_dir, "ck")
    train(config(data=dataset, steps=30, checkpoint_dir=folder, checkpoint_every=10), comm)
    resumed = config(data=dataset, steps=20, lr=0.01, checkpoint_dir=folder, checkpoint_every=5, keep_checkpoints=2,
                     resume=os.path.join(folder, checkpoint_name(10)))
    train(resumed, comm)
    assert [step for step, _ in on_root(comm, list_checkpoints, folder)] == [20, 30]


@pytest.mark.parametrize("existing,written,keep,expected", [
    ((100, 200, 300), 50, 3, [50, 200, 300]),
    ((100, 200, 300), 50, 1, [50]),
    ((99999999, 100000000), None, 1, [100000000]),
    ((2, 4, 6), 6, 2, [4, 6]),
])
def test_pruning_never_removes_the_file_just_written_and_orders_by_step(tmp_path, existing, written, keep, expected):
    for step in existing + ((written,) if written else ()):
        open(os.path.join(tmp_path, checkpoint_name(step)), "w").close()
    just = os.path.join(tmp_path, checkpoint_name(written)) if written else None
    prune_checkpoints(str(tmp_path), keep, just)
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == expected


# ---------------------------------------------------------------------------- 8. metrics after a resume


def records(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle]


ARITHMETIC = ("epoch", "step", "loss", "val_loss", "val_accuracy", "skipped_steps", "final")


@pytest.mark.parametrize("resume_step", [18, 12])
def test_resumed_metrics_equal_the_uninterrupted_runs(comm, dataset, shared_dir, resume_step):
    """An interrupted run's metrics file holds epochs past its last checkpoint; resumed from a
    mid-epoch (18) or an epoch-end (12) checkpoint, the file ends equal to the uninterrupted run's."""
    full, cut = os.path.join(shared_dir, "full.jsonl"), os.path.join(shared_dir, "cut.jsonl")
    folder = os.path.join(shared_dir, "ck")
    settings = config(data=dataset, steps=30, checkpoint_every=6, keep_checkpoints=10,
                      checkpoint_dir=os.path.join(shared_dir, "reference"))
    train(dataclasses.replace(settings, metrics=full), comm)
    train(dataclasses.replace(settings, metrics=cut, checkpoint_dir=folder), comm)
    train(dataclasses.replace(settings, metrics=cut, checkpoint_dir=os.path.join(shared_dir, "again"),
                              resume=os.path.join(folder, checkpoint_name(resume_step))), comm)
    expected, got = on_root(comm, records, full), on_root(comm, records, cut)
    assert [r.get("epoch") for r in got] == [r.get("epoch") for r in expected]
    for mine, theirs in zip(got, expected):
        assert {k: mine.get(k) for k in ARITHMETIC} == {k: theirs.get(k) for k in ARITHMETIC}


@pytest.mark.parametrize("bad", [{"loss_sums": [0.5] * 9, "kept_steps": 6}, {"loss_sums": "0.5", "kept_steps": 6},
                                 {"loss_sums": [float("nan")] * 8, "kept_steps": 6}, "sums",
                                 {"kept_steps": -1}, {"kept_steps": 7}, {"kept_steps": 2.5}],
                         ids=["sums of 9 ranks", "not a list", "NaN", "not a table", "kept -1", "kept past position",
                              "kept not an integer"])
def test_malformed_partial_epoch_sums_are_refused_in_one_line(comm, dataset, shared_dir, bad):
    """A checkpoint whose partial-epoch sums (digest recomputed) cannot be this run's: exit 2, naming the field."""
    folder = os.path.join(shared_dir, "ck")
    settings = config(data=dataset, steps=6, checkpoint_dir=folder)
    train(settings, comm)
    path = os.path.join(folder, checkpoint_name(6))

    def damage():
        saved = load_checkpoint(path)
        partial = saved.meta["partial_epoch"]
        if isinstance(bad, dict):
            partial.update(bad)
            if len(partial["loss_sums"]) == 8:
                partial["loss_sums"] = partial["loss_sums"][:comm.size]
        else:
            saved.meta["partial_epoch"] = bad
        save_checkpoint(path, saved)

    on_root(comm, damage)
    with pytest.raises(MpitrainError, match="ckpt-00000006.h5: checkpoint metadata 'partial_epoch' is malformed"):
        train(dataclasses.replace(settings, steps=12, resume=path, checkpoint_dir=os.path.join(shared_dir, "b")), comm)


FAULTS = os.path.join(os.path.dirname(__file__), "faults.py")


def test_kill_9_then_resume_auto_leaves_the_uninterrupted_metrics(comm, dataset, shared_dir):
    """The issue's example as jobs: rank 1 is SIGKILLed in step 29 of 30, after the epoch 2 record
    (step 24) and the checkpoint of step 20; `--resume auto` ends with the metrics file of a run
    that was never stopped."""
    full, cut = os.path.join(shared_dir, "full.jsonl"), os.path.join(shared_dir, "cut.jsonl")
    checkpointing = ("--checkpoint-dir", os.path.join(shared_dir, "ck"), "--checkpoint-every", "10",
                     "--sampler", "global")
    argv = mpitrain_argv(2, *job_args(dataset, *checkpointing, "--metrics", cut))
    at = argv.index("-m")
    runs = [run_on_root(comm, mpitrain_argv(2, *job_args(dataset, "--sampler", "global", "--metrics", full)), 90),
            run_on_root(comm, argv[:at] + [FAULTS, "kill", "29", "1", "--"] + argv[at + 2:], 90),
            run_on_root(comm, mpitrain_argv(2, *job_args(dataset, *checkpointing, "--metrics", cut,
                                                         "--resume", "auto")), 90)]
    assert [run["returncode"] != 0 for run in runs] == [False, True, False], runs
    expected, got = on_root(comm, records, full), on_root(comm, records, cut)
    assert [r.get("epoch") for r in got] == [r.get("epoch") for r in expected] == [1, 2, 3, None]
    for mine, theirs in zip(got, expected):
        assert {k: mine.get(k) for k in ARITHMETIC} == {k: theirs.get(k) for k in ARITHMETIC}
