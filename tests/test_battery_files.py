"""Issue 12's battery, the files mpitrain writes and trusts: output paths checked before step 1,
write errors as one line, checkpoint folders of another run, metrics after a resume, one
atomic writer with unguessable temporaries, the synthetic cache, shared-memory segments.

    mpirun -n 2 python -m pytest -m battery tests/test_battery_files.py

Full and read-only filesystems are small tmpfs mounts made here, so those cases need root; they
skip with that reason otherwise. Real jobs (exit status, kill -9) start `mpirun -n 2` from rank 0.
"""

import ast
import contextlib
import dataclasses
import json
import mmap
import os
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from harness import mpitrain_argv, run_on_root, write_on_root
from mpitrain import outputs
from mpitrain.cli import run as run_cli
from mpitrain.checkpoint import (Checkpoint, checkpoint_name, list_checkpoints, load_checkpoint, load_parameters,
                                 prune_checkpoints, save_checkpoint, save_parameters)
from mpitrain.comm import tune
from mpitrain.config import TrainConfig, validate
from mpitrain.data import cache, synth, tools
from mpitrain.data.rank import ensure_synthetic, synthetic_path
from mpitrain.errors import MpitrainError
from mpitrain.parallel.stage import Stage
from mpitrain.train import train

pytestmark = pytest.mark.battery

ROWS, FEATURES, CLASSES = 480, 12, 3
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="mounting a small tmpfs needs root")


@pytest.fixture
def dataset(comm, shared_dir):
    x, y = synth.make_classification(ROWS, FEATURES, CLASSES, seed=3)
    return write_on_root(comm, os.path.join(shared_dir, "small.h5"), x, y)


def config(**overrides) -> TrainConfig:
    """12-16-3 MLP, global batch 36, --sampler global: 12 steps per epoch on 432 training rows."""
    base = dict(model=f"{FEATURES}-16-{CLASSES}", batch_size=36, device="cpu", progress=False, seed=5,
                sampler="global")
    return validate(dataclasses.replace(TrainConfig(), **{**base, **overrides}))


def on_root(comm, action, *args):
    """Run action(*args) on rank 0 only; every rank returns its result once it is done."""
    result = action(*args) if comm.rank == 0 else None
    return comm.bcast(result, root=0)


@contextlib.contextmanager
def tmpfs(comm, folder: str, size: str = "256k", read_only: bool = False):
    """A small tmpfs mounted at `folder` (by rank 0; every rank of a one-host job sees it), unmounted after."""
    if comm.rank == 0:
        os.makedirs(folder, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], check=True)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", folder], check=True)
    comm.Barrier()
    try:
        yield folder
    finally:
        comm.Barrier()
        if comm.rank == 0:
            subprocess.run(["umount", "-l", folder], check=False)


@contextlib.contextmanager
def read_only_folder(comm, folder):
    with tmpfs(comm, folder, read_only=True) as mounted:
        yield mounted


def fill(folder: str) -> None:
    """Take every free byte of the filesystem holding folder."""
    handle = os.open(os.path.join(folder, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while os.write(handle, b"\0" * 4096):
                pass
    finally:
        os.close(handle)


def steps_taken(monkeypatch) -> list:
    """Counts forward/backward passes of this rank (the step code of every layout)."""
    calls, forward_backward = [], Stage.forward_backward

    def counting(stage, *args, **kwargs):
        calls.append(1)
        return forward_backward(stage, *args, **kwargs)

    monkeypatch.setattr(Stage, "forward_backward", counting)
    return calls


# ---------------------------------------------------------------------------- 3. outputs checked before step 1


def place(comm, shared_dir, kind: str, name: str):
    """A path for an output in a bad place: (path, context manager that holds the place, reason pattern)."""
    if kind == "missing folder":
        return os.path.join(shared_dir, "no", "such", "dir", name), contextlib.nullcontext(), "does not exist"
    if kind == "under a regular file":
        on_root(comm, lambda: open(os.path.join(shared_dir, "plain"), "w").close())
        return os.path.join(shared_dir, "plain", name), contextlib.nullcontext(), "(is not a folder|not a folder|Not a directory)"
    mount = os.path.join(shared_dir, "ro")
    return os.path.join(mount, name), read_only_folder(comm, mount), "Read-only file system"


BAD_PLACES = [(flag, kind) for flag in ("save", "metrics", "checkpoint_dir")
              for kind in ("missing folder", "under a regular file", "read-only mount")
              if (flag, kind) != ("checkpoint_dir", "missing folder")]  # a missing checkpoint folder is made


@pytest.mark.parametrize("flag,kind", [pytest.param(*case, marks=needs_root) if case[1] == "read-only mount" else case
                                       for case in BAD_PLACES])
def test_every_output_is_checked_before_step_1(comm, dataset, shared_dir, monkeypatch, flag, kind):
    """--save, --metrics and --checkpoint-dir in a missing folder, under a regular file or on a
    read-only mount: one error on every rank, and not one step trained."""
    path, holder, reason = place(comm, shared_dir, kind, "ck" if flag == "checkpoint_dir" else "out.h5")
    calls = steps_taken(monkeypatch)
    with holder:
        with pytest.raises(MpitrainError, match=f"cannot write.*{reason}") as caught:
            train(config(data=dataset, steps=300, **{flag: path}), comm)
    assert calls == []
    assert "\n" not in str(caught.value)


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
    with pytest.raises(MpitrainError, match=f"cannot write {bad}: (folder .* is not a folder|Not a directory|File exists)"):
        run_cli([*words[:-1], *argv, words[-1], bad])
    assert time.monotonic() - started < 10


def job_args(data: str, *extra: str) -> list[str]:
    return ["train", "--data", data, "--model", f"{FEATURES}-16-{CLASSES}", "--batch-size", "36", "--steps", "30",
            "--device", "cpu", "--no-progress", "--seed", "5", *extra]


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
    "text (eval --metrics, metrics rewrite)": lambda path: outputs.atomic_write(path, lambda out: out.write(b"0" * 500000),
                                                                                binary=True),
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
    assert run["stderr"].strip().splitlines() == [f"mpitrain: error: cannot write {target}: No space left on device"], run
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
    """A run continued from step 10 into a folder holding steps 10-30: each new checkpoint survives
    pruning although older step numbers sort after it."""
    folder = os.path.join(shared_dir, "ck")
    train(config(data=dataset, steps=30, checkpoint_dir=folder, checkpoint_every=10), comm)
    resumed = config(data=dataset, steps=20, lr=0.01, checkpoint_dir=folder, checkpoint_every=5,
                     resume=os.path.join(folder, checkpoint_name(10)))
    train(resumed, comm)
    steps = [step for step, _ in on_root(comm, list_checkpoints, folder)]
    assert 20 in steps and len(steps) == 3


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
    assert [r["epoch"] for r in got] == [r["epoch"] for r in expected]
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
    (step 24) and the checkpoint of step 18; `--resume auto` ends with the metrics file of a run
    that was never stopped."""
    full, cut = os.path.join(shared_dir, "full.jsonl"), os.path.join(shared_dir, "cut.jsonl")
    checkpointing = ("--checkpoint-dir", os.path.join(shared_dir, "ck"), "--checkpoint-every", "9",
                     "--sampler", "global")
    argv = mpitrain_argv(2, *job_args(dataset, *checkpointing, "--metrics", cut))
    at = argv.index("-m")
    runs = [run_on_root(comm, mpitrain_argv(2, *job_args(dataset, "--sampler", "global", "--metrics", full)), 90),
            run_on_root(comm, argv[:at] + [FAULTS, "kill", "29", "1", "--"] + argv[at + 2:], 90),
            run_on_root(comm, mpitrain_argv(2, *job_args(dataset, *checkpointing, "--metrics", cut,
                                                         "--resume", "auto")), 90)]
    assert [run["returncode"] != 0 for run in runs] == [False, True, False], runs
    expected, got = on_root(comm, records, full), on_root(comm, records, cut)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in expected] == [1, 2, 3, 3]
    for mine, theirs in zip(got, expected):
        assert {k: mine.get(k) for k in ARITHMETIC} == {k: theirs.get(k) for k in ARITHMETIC}


# ---------------------------------------------------------------------------- 12. one atomic writer, no planted links


@pytest.mark.parametrize("binary", [False, True], ids=["h5", "text"])
def test_a_link_planted_at_the_temporary_name_is_never_followed(tmp_path, monkeypatch, binary):
    """Even a neighbour who guessed the temporary's name cannot redirect the write: creation is
    exclusive, so the write fails and both the victim and the target are untouched."""
    victim = os.path.join(tmp_path, "victim")
    with open(victim, "wb") as out:
        out.write(b"precious")
    monkeypatch.setattr(outputs.secrets, "token_hex", lambda n: "guessed")
    os.symlink(victim, os.path.join(tmp_path, ".m.h5.guessed.tmp"))
    write = (lambda out: out.write(b"new")) if binary else (lambda f: f.create_dataset("x", data=[1]))
    with pytest.raises(MpitrainError, match="cannot write .*m.h5: File exists"):
        outputs.atomic_write(os.path.join(tmp_path, "m.h5"), write, binary)
    assert open(victim, "rb").read() == b"precious"
    assert not os.path.exists(os.path.join(tmp_path, "m.h5"))


def test_temporaries_are_unpredictable(tmp_path, monkeypatch):
    names = []
    create = outputs.create_temporary

    def spy(path, write, binary=False):
        names.append(create(path, write, binary))
        return names[-1]

    monkeypatch.setattr(outputs, "create_temporary", spy)
    for _ in range(2):
        outputs.atomic_write(os.path.join(tmp_path, "m.h5"), lambda f: None)
    assert len(set(names)) == 2 and all(str(os.getpid()) not in os.path.basename(n) for n in names)


def test_planted_links_at_the_old_names_do_not_redirect_checkpoints_or_the_model(comm, dataset, shared_dir):
    """The issue's attack: links at `.ckpt-00000010.h5.tmp<pid>` and `.model.h5.tmp<pid>` for the
    writer's pid (and the next ones), pointing at a victim file."""
    victim = os.path.join(shared_dir, "victim")
    folder = os.path.join(shared_dir, "shared")

    def plant():
        os.makedirs(folder)
        with open(victim, "wb") as out:
            out.write(b"precious")
        for pid in range(os.getpid(), os.getpid() + 50):
            for name in (f".{checkpoint_name(10)}.tmp{pid}", f".model.h5.tmp{pid}"):
                os.symlink(victim, os.path.join(folder, name))

    on_root(comm, plant)
    save = os.path.join(folder, "model.h5")
    result = train(config(data=dataset, steps=10, checkpoint_dir=folder, save=save), comm)
    checks = on_root(comm, lambda: (open(victim, "rb").read(), os.path.islink(save),
                                    os.path.islink(os.path.join(folder, checkpoint_name(10)))))
    assert checks == (b"precious", False, False)
    saved = on_root(comm, load_parameters, save)
    for name, value in result.parameters.items():
        np.testing.assert_array_equal(saved[name], value)


def test_one_writer_for_every_file(comm):
    """No module of mpitrain renames files or creates HDF5 files for writing on its own: they all
    go through mpitrain/outputs.py (the metrics JSONL stream is appended in place, by design)."""
    import mpitrain

    root = os.path.dirname(mpitrain.__file__)
    offenders = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if not name.endswith(".py") or path.endswith("outputs.py"):
                continue
            text = open(path).read()
            for needle in ("os.replace(", "os.rename(", 'h5py.File(path, "w")', '"w") as handle', "mkstemp("):
                if needle in text:
                    offenders.append(f"{os.path.relpath(path, root)}: {needle}")
    assert offenders == []


# ---------------------------------------------------------------------------- 13. the synthetic-data cache


@pytest.fixture
def temp_folder(comm, shared_dir, monkeypatch):
    """tempfile.gettempdir() is a fresh folder for this test, on every rank."""
    folder = os.path.join(shared_dir, "tmp")
    on_root(comm, lambda: (os.makedirs(folder), os.chmod(folder, 0o1777)))
    monkeypatch.setattr(tempfile, "tempdir", folder)
    return folder


def labels_of(path: str) -> np.ndarray:
    with h5py.File(path, "r", locking=False) as handle:
        return handle["y"][()]


def plant_zeros(path: str) -> None:
    """A data set of the right shape with every label 0, as a neighbour would plant it."""
    synth.write_h5(path, np.zeros((120, FEATURES), np.float32), np.zeros(120, np.int64))


PLANTS = {
    "planted by another user": lambda path: (plant_zeros(path), cache.seal(path), os.chown(path, 65534, 65534)),
    "writable by others": lambda path: (plant_zeros(path), cache.seal(path), os.chmod(path, 0o666)),
    "digest does not match": lambda path: (plant_zeros(path), open(path + ".sha256", "w").write("0" * 64)),
    "no digest": plant_zeros,
    "a symlink": lambda path: (plant_zeros(path + ".elsewhere"), os.symlink(path + ".elsewhere", path),
                               cache.seal(path + ".elsewhere"),
                               os.symlink(path + ".elsewhere.sha256", path + ".sha256")),
}


@pytest.mark.parametrize("plant", PLANTS)
def test_an_untrusted_synthetic_cache_is_regenerated(comm, temp_folder, plant):
    if plant == "planted by another user" and not IS_ROOT:
        pytest.skip("handing a file to another user needs root")
    settings = config(synth_samples=120)
    widths = [FEATURES, 16, CLASSES]
    path = on_root(comm, synthetic_path, settings, FEATURES, CLASSES)
    on_root(comm, PLANTS[plant], path)
    used = ensure_synthetic(settings, widths, comm)
    expected = synth.make_classification(120, FEATURES, CLASSES, settings.seed)[1]
    np.testing.assert_array_equal(on_root(comm, labels_of, used), expected)
    assert on_root(comm, lambda: (os.path.islink(used), cache.trusted(used))) == (False, True)


def test_a_trusted_cache_is_reused(comm, temp_folder):
    settings = config(synth_samples=120)
    first = ensure_synthetic(settings, [FEATURES, 16, CLASSES], comm)
    inode = on_root(comm, lambda: os.stat(first).st_ino)
    again = ensure_synthetic(settings, [FEATURES, 16, CLASSES], comm)
    assert again == first and on_root(comm, lambda: os.stat(again).st_ino) == inode


@pytest.mark.parametrize("taken", ["a folder of another user", "a symlink", "open to everyone"])
def test_a_private_folder_held_by_someone_else_is_not_used(comm, temp_folder, taken):
    if taken == "a folder of another user" and not IS_ROOT:
        pytest.skip("handing a folder to another user needs root")
    name = os.path.join(temp_folder, f"mpitrain-{os.getuid()}")

    def take():
        if taken == "a symlink":
            os.makedirs(name + "-elsewhere")
            os.symlink(name + "-elsewhere", name)
        else:
            os.mkdir(name)
            if taken == "open to everyone":
                os.chmod(name, 0o777)
            else:
                os.chown(name, 65534, 65534)

    on_root(comm, take)
    used = ensure_synthetic(config(synth_samples=120), [FEATURES, 16, CLASSES], comm)
    assert not used.startswith(name + os.sep) and not used.startswith(name + "-elsewhere")
    assert on_root(comm, lambda: oct(os.stat(os.path.dirname(used)).st_mode & 0o777)) == "0o700"


# ---------------------------------------------------------------------------- 14. shared-memory segments

SEGMENTS_JOB = """
import os, signal, sys
from mpi4py import MPI
from mpitrain.comm import world
world()
lines = [l.split(None, 5)[5].strip() for l in open("/proc/self/maps") if "/dev/shm/mpich_" in l]
with open(f"{sys.argv[1]}.{MPI.COMM_WORLD.rank}", "w") as out:
    out.write(repr(sorted(set(lines))))
MPI.COMM_WORLD.Barrier()
if MPI.COMM_WORLD.rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
MPI.COMM_WORLD.Barrier()
"""


def test_a_job_killed_hard_leaves_no_segment(comm, shared_dir):
    """Rank 1 SIGKILLs itself after start-up: the segments every rank mapped have no name left."""
    script = os.path.join(shared_dir, "segments.py")
    on_root(comm, lambda: open(script, "w").write(SEGMENTS_JOB))
    mpirun = mpitrain_argv(2)[:3]
    run = run_on_root(comm, [*mpirun, sys.executable, script, script], timeout=60)
    mapped = on_root(comm, lambda: [ast.literal_eval(open(f"{script}.{rank}").read()) for rank in (0, 1)])
    assert run["returncode"] != 0 and all(mapped), (run, mapped)
    names = {name.replace(" (deleted)", "") for lines in mapped for name in lines}
    assert all(line.endswith("(deleted)") for lines in mapped for line in lines), mapped
    assert on_root(comm, lambda: [n for n in names if os.path.exists(n)]) == []


def test_doctor_removes_only_stale_segments_of_the_user(comm, shared_dir):
    folder = os.path.join(shared_dir, "shm")
    old = time.time() - 3600

    def make():
        os.makedirs(folder)
        for name in ("mpich_shm_dead_0", "mpich_vci_dead_0", "mpich_shm_live_0", "mpich_shm_young_0",
                     "mpich_shm_other_0", "unrelated_0"):
            with open(os.path.join(folder, name), "wb") as out:
                out.write(b"\0" * 4096)
            if name != "mpich_shm_young_0":
                os.utime(os.path.join(folder, name), (old, old))
        os.symlink(os.path.join(folder, "unrelated_0"), os.path.join(folder, "mpich_shm_link_0"))
        if IS_ROOT:
            os.chown(os.path.join(folder, "mpich_shm_other_0"), 65534, 65534)

    on_root(comm, make)
    with open(os.path.join(folder, "mpich_shm_live_0"), "r+b") as live, mmap.mmap(live.fileno(), 4096):
        run = run_on_root(comm, mpitrain_argv(0, "doctor", "--clean-shm", "--shm-dir", folder, "--min-age", "60"))
        left = on_root(comm, lambda: sorted(os.listdir(folder)))
    assert run["returncode"] == 0, run
    assert f"{2 if IS_ROOT else 3} stale segment(s) removed" in run["stdout"], run
    kept = ["mpich_shm_link_0", "mpich_shm_live_0", "mpich_shm_young_0", "unrelated_0"]
    assert left == sorted(kept + (["mpich_shm_other_0"] if IS_ROOT else []))
