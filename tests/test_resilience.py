"""Checkpoints, resume, preemption and the NaN policy inside the training loop.

In-process tests run the trainer on the test's communicator; the kill -9 and exit-status tests
start `mpirun -n 2` jobs from rank 0 (tests/faults.py injects the fault on one rank).
"""

import dataclasses
import os
import signal

import numpy as np
import pytest
from mpi4py import MPI

import mpitrain.train
from mpitrain.comm.buckets import GradientSync
from harness import mpitrain_argv, run_on_root, write_on_root
from mpitrain.checkpoint import checkpoint_name, list_checkpoints, load_checkpoint, load_parameters
from mpitrain.config import TrainConfig, validate
from mpitrain.data import synth
from mpitrain.errors import MpitrainError
from mpitrain.preempt import EXIT_PREEMPTED, Preempted
from mpitrain.backend import step_finite
from mpitrain.train import train

ROWS, FEATURES, CLASSES = 480, 12, 3
FAULTS = os.path.join(os.path.dirname(__file__), "faults.py")


@pytest.fixture
def dataset(comm, shared_dir):
    x, y = synth.make_classification(ROWS, FEATURES, CLASSES, seed=3)
    return write_on_root(comm, os.path.join(shared_dir, "small.h5"), x, y)


def config(**overrides) -> TrainConfig:
    """12-16-3 MLP, global batch 36: 12 steps per epoch with --sampler global."""
    base = dict(model=f"{FEATURES}-16-{CLASSES}", batch_size=36, device="cpu", progress=False, seed=5)
    return validate(dataclasses.replace(TrainConfig(), **{**base, **overrides}))


def assert_identical(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def signal_in_step(monkeypatch, comm, step: int) -> None:
    """The last rank sends itself SIGUSR1 during `step` (counted from 1), as Slurm would."""
    schedule = mpitrain.train.schedule

    def scheduled(kind, base_lr, index, total, warmup, **options):
        if index + 1 == step and comm.rank == comm.size - 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return schedule(kind, base_lr, index, total, warmup, **options)

    monkeypatch.setattr(mpitrain.train, "schedule", scheduled)


# ---------------------------------------------------------------------------- resume in-process


@pytest.mark.parametrize("sampler,optimizer", [("global", "adam"), ("shard", "sgd")])
def test_resume_equals_uninterrupted_bit_for_bit(comm, dataset, shared_dir, sampler, optimizer):
    """Resuming from an epoch-boundary and from a mid-epoch checkpoint both end on the same bits."""
    folder = os.path.join(shared_dir, "ckpt")
    settings = config(data=dataset, sampler=sampler, optimizer=optimizer, momentum=0.9 if optimizer == "sgd" else 0.0,
                      lr=0.05 if optimizer == "sgd" else 0.01, steps=30, schedule="cosine", checkpoint_dir=folder,
                      checkpoint_every=6, keep_checkpoints=10)
    full = train(settings, comm)
    steps = [step for step, _ in list_checkpoints(folder)]
    spe = load_checkpoint(os.path.join(folder, checkpoint_name(6))).meta["steps_per_epoch"]
    resumed = {}
    for start in (6, spe if spe % 6 == 0 else 12):
        path = os.path.join(folder, checkpoint_name(start))
        elsewhere = os.path.join(shared_dir, f"r{start}")
        resumed[start] = train(dataclasses.replace(settings, resume=path, checkpoint_dir=elsewhere), comm)
    assert steps == [6, 12, 18, 24, 30]
    for start, result in resumed.items():
        assert_identical(result.parameters, full.parameters)
        assert result.history[-1]["val_loss"] == full.history[-1]["val_loss"]
        assert [r["epoch"] for r in result.history] == [r["epoch"] for r in full.history if r["step"] > start]


def test_checkpoint_holds_the_whole_state(comm, dataset, shared_dir):
    folder = os.path.join(shared_dir, "ckpt")
    settings = config(data=dataset, sampler="global", steps=5, checkpoint_dir=folder)
    result = train(settings, comm)
    checkpoint = load_checkpoint(os.path.join(folder, checkpoint_name(5)))
    meta, arrays = checkpoint.meta, checkpoint.arrays
    assert (meta["step"], meta["epoch"], meta["position"], meta["world_size"]) == (5, 0, 5, comm.size)
    assert meta["optimizer"] == {"kind": "adam", "t": 5}
    assert meta["config"]["lr"] == settings.lr and meta["config"]["model"] == settings.model
    assert_identical({k[6:]: v for k, v in arrays.items() if k.startswith("model/")}, result.parameters)
    for buffer in ("m", "v"):
        assert {f"optimizer/{buffer}/{name}" for name in result.parameters} <= arrays.keys()
        for name, value in result.parameters.items():
            assert arrays[f"optimizer/{buffer}/{name}"].shape == value.shape
    assert arrays["rng/numpy_key"].shape == (comm.size, 624) and arrays["rng/python_state"].shape == (comm.size, 625)


def test_truncated_newest_checkpoint_falls_back_with_a_warning(comm, dataset, shared_dir, capfd):
    folder = os.path.join(shared_dir, "ckpt")
    settings = config(data=dataset, sampler="global", steps=16, checkpoint_dir=folder, checkpoint_every=4)
    full = train(settings, comm)
    newest = os.path.join(folder, checkpoint_name(16))
    if comm.rank == 0:
        with open(newest, "r+b") as raw:
            raw.truncate(os.path.getsize(newest) * 2 // 3)
    comm.Barrier()
    capfd.readouterr()
    resumed = train(dataclasses.replace(settings, resume="auto"), comm)
    captured = capfd.readouterr()
    output = comm.bcast(captured.out + captured.err, root=0)
    assert_identical(resumed.parameters, full.parameters)
    assert "warning:" in output and "ckpt-00000016.h5" in output and "previous checkpoint" in output
    assert "resumed from" in output and "ckpt-00000012.h5 (step 12" in output


def test_resume_auto_without_checkpoints_starts_at_step_zero(comm, dataset, shared_dir):
    settings = config(data=dataset, sampler="global", steps=4)
    fresh = train(dataclasses.replace(settings, checkpoint_dir=os.path.join(shared_dir, "empty"), resume="auto"), comm)
    assert_identical(fresh.parameters, train(settings, comm).parameters)


def test_checkpoint_of_another_model_is_refused_naming_both_shapes(comm, dataset, shared_dir):
    folder = os.path.join(shared_dir, "ckpt")
    train(config(data=dataset, steps=2, checkpoint_dir=folder), comm)
    other = config(data=dataset, steps=4, model=f"{FEATURES}-8-{CLASSES}", checkpoint_dir=folder, resume="auto")
    expected = r"checkpoint is for --model 12-16-3 but this run builds --model 12-8-3"
    with pytest.raises(MpitrainError, match=expected):
        train(other, comm)


def test_keeps_the_newest_k(comm, dataset, shared_dir):
    folder = os.path.join(shared_dir, "ckpt")
    train(config(data=dataset, steps=10, checkpoint_dir=folder, checkpoint_every=2, keep_checkpoints=2), comm)
    assert [step for step, _ in list_checkpoints(folder)] == [8, 10]


# ---------------------------------------------------------------------------- preemption in-process


def test_signal_on_one_rank_stops_every_rank_at_the_same_checkpoint(comm, dataset, shared_dir, monkeypatch):
    """SIGUSR1 on the last rank in step 7: every rank stops after step 8 (the next agreement) with
    the same checkpoint; resuming from it finishes exactly like an uninterrupted run."""
    folder = os.path.join(shared_dir, "ckpt")
    settings = config(data=dataset, sampler="shard", steps=20, checkpoint_dir=folder)
    handler = signal.getsignal(signal.SIGUSR1)
    reference = train(dataclasses.replace(settings, checkpoint_dir=None), comm)
    signal_in_step(monkeypatch, comm, 7)
    try:
        train(settings, comm)
        stopped = None
    except Preempted as stop:
        stopped = (stop.step, stop.path, stop.reason)
    monkeypatch.undo()
    everyone = comm.allgather(stopped)
    resumed = train(dataclasses.replace(settings, resume="auto"), comm)
    assert everyone == [everyone[0]] * comm.size
    assert everyone[0] == (8, os.path.join(folder, checkpoint_name(8)), f"SIGUSR1 on rank(s) {comm.size - 1}")
    assert load_checkpoint(everyone[0][1]).meta["step"] == 8
    assert_identical(resumed.parameters, reference.parameters)
    assert signal.getsignal(signal.SIGUSR1) is handler, "handler not restored"


# ---------------------------------------------------------------------------- NaN and Inf

NAN_STEPS = (4, 9)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_step_finite_finds_every_kind_of_non_finite_and_survives_overflow(dtype):
    """The fast path (loss + a dot product) must never pass a NaN or an Inf, in the gradient or
    the loss, and a sum of squares that overflows from finite values must not fail the check
    (the exact test decides)."""
    grads = np.linspace(-1, 1, 1001, dtype=dtype).reshape(7, 143)
    assert step_finite(0.0, grads) and step_finite(0.0, grads[:, ::2])
    for bad in (np.nan, np.inf, -np.inf):
        poisoned = grads.copy()
        poisoned[3, 100] = bad
        assert not step_finite(0.0, poisoned), bad
        assert not step_finite(np.asarray(bad, dtype=dtype), grads), bad
    huge = np.full(16, np.finfo(dtype).max / 2, dtype=dtype)
    assert step_finite(0.0, huge)


def nan_in_gradient(monkeypatch) -> None:
    """A NaN in the summed gradient in steps NAN_STEPS (a test-only patch of the trainer's gradient
    sync). The sum is the same on every rank, so every rank gets it; each rank checks only its
    1/dp block, so here one rank finds it and every rank must act on it."""
    wait, calls = GradientSync.wait, [0]

    def poisoned(sync):
        wait(sync)
        calls[0] += 1
        if calls[0] in NAN_STEPS:
            sync.views[0][0] = np.nan

    monkeypatch.setattr(GradientSync, "wait", poisoned)


def test_nan_gradient_aborts_every_rank_naming_the_step(comm, dataset, monkeypatch):
    nan_in_gradient(monkeypatch)
    expected = rf"step {NAN_STEPS[0]}: NaN or Inf in the all-reduced gradient; --on-nan skip"
    with pytest.raises(MpitrainError, match=expected):
        train(config(data=dataset, sampler="global", steps=12), comm)


def test_nan_gradient_with_skip_drops_those_steps_on_every_rank(comm, dataset, monkeypatch):
    """--on-nan skip: both poisoned steps are skipped and counted, everywhere, and the result
    equals the one-process run that skipped the same steps."""
    settings = config(data=dataset, sampler="global", steps=12, on_nan="skip", dtype="float64")
    nan_in_gradient(monkeypatch)
    result = train(settings, comm)
    monkeypatch.undo()
    nan_in_gradient(monkeypatch)
    serial = train(dataclasses.replace(settings), MPI.COMM_SELF)
    monkeypatch.undo()
    clean = train(dataclasses.replace(settings), MPI.COMM_SELF)
    assert result.history[-1]["skipped_steps"] == serial.history[-1]["skipped_steps"] == len(NAN_STEPS)
    assert clean.history[-1]["skipped_steps"] == 0
    for name, value in serial.parameters.items():
        assert np.all(np.isfinite(result.parameters[name])), name
        np.testing.assert_allclose(result.parameters[name], value, rtol=1e-10, atol=1e-12, err_msg=name)
    assert any(not np.allclose(clean.parameters[name], value) for name, value in serial.parameters.items())


# ---------------------------------------------------------------------------- real jobs: kill -9, exit 75


def job_args(data: str, *extra: str) -> list[str]:
    return ["train", "--data", data, "--model", f"{FEATURES}-16-{CLASSES}", "--batch-size", "36", "--steps", "30",
            "--device", "cpu", "--no-progress", "--seed", "5", *extra]


def faulty_argv(fault: str, step: int, rank: int, *args: str) -> list[str]:
    argv = mpitrain_argv(2, *args)
    at = argv.index("-m")
    return argv[:at] + [FAULTS, fault, str(step), str(rank), "--"] + argv[at + 2:]


def test_kill_9_of_one_rank_then_resume_auto(comm, dataset, shared_dir):
    """Rank 1 is SIGKILLed in step 13 of 30 with a checkpoint every 5 steps: the job dies, and
    `--resume auto` loses at most 5 steps and ends on the uninterrupted run's bits."""
    folder, every = os.path.join(shared_dir, "ckpt"), 5
    reference = os.path.join(shared_dir, "reference.h5")
    resumed = os.path.join(shared_dir, "resumed.h5")
    runs = [run_on_root(comm, mpitrain_argv(2, *job_args(dataset, "--save", reference)), timeout=90)]
    checkpointing = ("--checkpoint-dir", folder, "--checkpoint-every", str(every))
    runs.append(run_on_root(comm, faulty_argv("kill", 13, 1, *job_args(dataset, *checkpointing)), timeout=90))
    resume = job_args(dataset, *checkpointing, "--resume", "auto", "--save", resumed)
    runs.append(run_on_root(comm, mpitrain_argv(2, *resume), timeout=90))
    assert runs[0]["returncode"] == 0, runs[0]
    assert runs[1]["returncode"] not in (0, None), runs[1]
    assert runs[2]["returncode"] == 0, runs[2]
    resumed_at = int(runs[2]["stdout"].split("resumed from ")[1].split("(step ")[1].split(",")[0])
    assert 12 - resumed_at <= every, runs[2]["stdout"]
    assert_identical(load_parameters(resumed), load_parameters(reference))


def test_sigusr1_job_exits_with_the_requeue_status_and_resumes(comm, dataset, shared_dir):
    folder = os.path.join(shared_dir, "ckpt")
    reference = os.path.join(shared_dir, "reference.h5")
    resumed = os.path.join(shared_dir, "resumed.h5")
    runs = [run_on_root(comm, mpitrain_argv(2, *job_args(dataset, "--save", reference)), timeout=90)]
    signalled = job_args(dataset, "--checkpoint-dir", folder)
    runs.append(run_on_root(comm, faulty_argv("signal", 9, 1, *signalled), timeout=90))
    names = comm.bcast(os.listdir(folder) if comm.rank == 0 else None, root=0)
    runs.append(run_on_root(comm, mpitrain_argv(2, *job_args(dataset, "--checkpoint-dir", folder, "--resume", "auto",
                                                             "--save", resumed)), timeout=90))
    assert runs[1]["returncode"] == EXIT_PREEMPTED, runs[1]
    # The signal arrives during step 9's forward/backward, before that step's agreement.
    assert "preempted by SIGUSR1 on rank(s) 1: stopped after step 9" in runs[1]["stderr"], runs[1]
    assert names == [checkpoint_name(9)]
    assert runs[2]["returncode"] == 0 and "resumed from" in runs[2]["stdout"], runs[2]
    assert_identical(load_parameters(resumed), load_parameters(reference))


def test_checkpoint_flags_are_accepted_in_every_layout():
    for parallel in ({"tp": 2}, {"pp": 2}, {"micro_batches": 2}, {"sync": "ps"}, {"sync": "ps", "ps_mode": "async"}):
        assert config(checkpoint_dir="ckpt", on_nan="skip", **parallel).checkpoint_dir == "ckpt"
