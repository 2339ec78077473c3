"""Issue 12's battery, security of the files mpitrain writes and trusts: one atomic writer with
unguessable temporaries that never follows a planted link, a synthetic-data cache trusted only
when private and digest-checked, shared-memory segments of killed jobs.

    mpirun -n 2 python -m pytest -m battery
"""

import ast
import mmap
import os
import sys
import tempfile
import time

import h5py
import numpy as np
import pytest

from battery_files_common import CLASSES, FEATURES, IS_ROOT, config, on_root, write_dataset
from harness import mpitrain_argv, run_on_root
from mpitrain import outputs
from mpitrain.checkpoint import checkpoint_name, load_parameters
from mpitrain.data import cache, synth
from mpitrain.data.rank import ensure_synthetic, synthetic_path
from mpitrain.errors import MpitrainError
from mpitrain.train import train

pytestmark = pytest.mark.battery


@pytest.fixture
def dataset(comm, shared_dir):
    return write_dataset(comm, shared_dir)


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
