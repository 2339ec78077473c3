"""Helpers of the battery on the files mpitrain writes (tests/test_battery_files*.py): small
training configs, rank-0 actions, tmpfs mounts for full and read-only filesystems."""

import contextlib
import dataclasses
import os
import subprocess

import pytest

from harness import write_on_root
from mpitrain.config import TrainConfig, validate
from mpitrain.data import synth
from mpitrain.parallel.stage import Stage

ROWS, FEATURES, CLASSES = 480, 12, 3
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="mounting a small tmpfs needs root")


def write_dataset(comm, shared_dir) -> str:
    """A 480-row, 12-feature, 3-class set written by rank 0; its path on every rank."""
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


def job_args(data: str, *extra: str) -> list[str]:
    return ["train", "--data", data, "--model", f"{FEATURES}-16-{CLASSES}", "--batch-size", "36", "--steps", "30",
            "--device", "cpu", "--no-progress", "--seed", "5", *extra]
