"""Parameter server: sync equals data parallelism, async and stale-synchronous converge, the staleness
bound holds, several servers equal one, bad layouts and failing ranks end the job with a message."""

import dataclasses
import json
import os
import re
import time

import numpy as np
import pytest
from mpi4py import MPI

from harness import mpitrain_argv, run_on_root, write_on_root
from mpitrain.config import TrainConfig, validate
from mpitrain.data import synth
from mpitrain.errors import MpitrainError
from mpitrain.nn.model import Model, parse_widths
from mpitrain.parallel.grid import dense_param_counts
from mpitrain.presets import PRESETS
from mpitrain.train import train


@pytest.fixture
def linreg(comm, shared_dir):
    """The preset's linear-regression set: synth_samples rows of y = 2 x0 + 3 x1 + N(0, 1)."""
    x, y = synth.make_linreg(PRESETS["linreg-ps"].values["synth_samples"], seed=0)
    return write_on_root(comm, os.path.join(shared_dir, "linreg.h5"), x, y)


def config(**overrides) -> TrainConfig:
    base = dict(model="12-16-3", batch_size=18, dtype="float64", device="cpu", progress=False,
                sampler="global", val_fraction=0.1, seed=5, sync="ps")
    return validate(dataclasses.replace(TrainConfig(), **{**base, **overrides}))


def need_ranks(comm, servers: int, workers: int = 1) -> None:
    if comm.size < servers + workers:
        pytest.skip(f"needs a world of {servers + workers} or more ({servers} server(s), {workers} worker(s))")


def flat(parameters: dict) -> np.ndarray:
    return np.concatenate([parameters[name].ravel() for name in sorted(parameters)])


def run_on_root_politely(comm, argv, timeout):
    """run_on_root, with the other ranks sleeping instead of spinning in MPI while rank 0's job runs:
    on a two-core machine a spinning rank takes a core from the job under test."""
    result = run_on_root(MPI.COMM_SELF, argv, timeout=timeout) if comm.rank == 0 else None
    arrived = comm.Ibarrier()
    while not arrived.Test():
        time.sleep(0.01)
    return comm.bcast(result, root=0)


def slow_down(monkeypatch, comm, ms: float) -> None:
    """Rank 0 (a worker at every world size) sleeps `ms` before each backward pass: a straggler."""
    if comm.rank != 0:
        return
    backward = Model.backward

    def slow_backward(self, *args, **kwargs):
        time.sleep(ms / 1000)
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(Model, "backward", slow_backward)


# ---------------------------------------------------------------------------- sync == data parallelism


@pytest.mark.parametrize("servers", [1, 2])
@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("adam", 0.01)])
def test_sync_equals_one_process_run(comm, small_classification, servers, optimizer, lr):
    """20 sync steps on P - S workers equal 20 steps of one process over the same global batches (float64)."""
    need_ranks(comm, servers)
    settings = config(data=small_classification, optimizer=optimizer, lr=lr, steps=20, servers=servers,
                      momentum=0.9 if optimizer == "sgd" else 0.0, weight_decay=1e-3, schedule="cosine")
    ps = train(settings, comm).parameters
    oracle = train(dataclasses.replace(settings, sync="allreduce"), MPI.COMM_SELF).parameters
    initial = Model([12, 16, 3], "relu", np, np.float64, seed=5).state()
    np.testing.assert_allclose(flat(ps), flat(oracle), rtol=1e-10, atol=1e-12)
    assert not np.allclose(flat(oracle), flat(initial)), "nothing trained"


def test_sync_equals_data_parallel_run_on_the_workers(comm, small_classification):
    """With --sampler shard each worker reads the rows a data-parallel rank of a W-rank job reads, so
    sync PS on W workers + 1 server equals all-reduce data parallelism on W ranks."""
    need_ranks(comm, 1)
    settings = config(data=small_classification, sampler="shard", optimizer="adam", lr=0.01, steps=20)
    ps = train(settings, comm).parameters
    workers = comm.Split(0 if comm.rank < comm.size - 1 else MPI.UNDEFINED, comm.rank)
    data_parallel = None
    if workers != MPI.COMM_NULL:
        data_parallel = train(dataclasses.replace(settings, sync="allreduce"), workers).parameters
        workers.Free()
    data_parallel = comm.bcast(data_parallel, root=0)
    np.testing.assert_allclose(flat(ps), flat(data_parallel), rtol=1e-10, atol=1e-12)


def test_init_from_starts_the_servers(comm, small_classification, shared_dir):
    """--init-from loads the starting θ into the servers: sync PS from a saved model equals the
    one-process run from the same file."""
    need_ranks(comm, 1)
    start = os.path.join(shared_dir, "start.h5")
    train(config(data=small_classification, sync="allreduce", steps=5, save=start), comm)
    settings = config(data=small_classification, optimizer="sgd", lr=0.1, steps=10, init_from=start)
    ps = train(settings, comm).parameters
    oracle = train(dataclasses.replace(settings, sync="allreduce"), MPI.COMM_SELF).parameters
    fresh = train(dataclasses.replace(settings, sync="allreduce", init_from=None), MPI.COMM_SELF).parameters
    np.testing.assert_allclose(flat(ps), flat(oracle), rtol=1e-10, atol=1e-12)
    assert not np.allclose(flat(oracle), flat(fresh)), "the file changed nothing"


def test_model_parallel_flags_are_refused(comm, small_classification):
    with pytest.raises(MpitrainError, match="does not combine with --tp, --pp or --micro-batches"):
        train(config(data=small_classification, tp=2), comm)


def test_two_servers_equal_one_server(comm, small_classification):
    """Splitting θ over 2 servers changes nothing: same workers, same sums, element-wise optimizer."""
    need_ranks(comm, 2)
    settings = config(data=small_classification, optimizer="adam", lr=0.01, steps=15)
    two = train(dataclasses.replace(settings, servers=2), comm).parameters
    # The same number of workers with one server: the first P - 1 ranks.
    fewer = comm.Split(0 if comm.rank < comm.size - 1 else MPI.UNDEFINED, comm.rank)
    one = None
    if fewer != MPI.COMM_NULL:
        one = train(settings, fewer).parameters
        fewer.Free()
    one = comm.bcast(one, root=0)
    np.testing.assert_array_equal(flat(two), flat(one))


# ---------------------------------------------------------------------------- async and stale-synchronous


@pytest.mark.parametrize("mode,staleness", [("async", 0), ("sync", 2)])
def test_linear_regression_converges(comm, linreg, mode, staleness):
    """Asynchronous and stale-synchronous SGD fit theta within 0.1 of (2, 3). A larger learning rate
    with cosine decay than the preset's (the preset itself is run below) keeps it to 360 steps: on two
    shared cores each stale-synchronous step costs several context switches."""
    need_ranks(comm, 1)
    settings = config(data=linreg, model="2-1", loss="mse", optimizer="sgd", lr=0.3, schedule="cosine",
                      batch_size=200, epochs=4, sampler="shard", ps_mode=mode, staleness=staleness)
    theta = train(settings, comm).parameters["0/weight"].ravel()
    np.testing.assert_allclose(theta, [2.0, 3.0], atol=0.1)


@pytest.mark.parametrize("mode,staleness", [("async", 0), ("sync", 2)])
def test_mlp_reaches_90_percent(comm, shared_dir, mode, staleness):
    """A small ReLU MLP with Adam (the default recipe, scaled down) learns the synthetic set."""
    need_ranks(comm, 1)
    x, y = synth.make_classification(1200, 32, 4, seed=2)
    path = write_on_root(comm, os.path.join(shared_dir, "mlp.h5"), x, y)
    settings = config(data=path, model="32-64-4", dtype="float32", sampler="shard", batch_size=32, epochs=3,
                      optimizer="adam", lr=3e-3, ps_mode=mode, staleness=staleness)
    history = train(settings, comm).history
    assert history[-1]["val_accuracy"] >= 0.9, history


# ---------------------------------------------------------------------------- the servers' counters


@pytest.mark.parametrize("bound", [0, 1, 3])
def test_staleness_bound_is_never_exceeded(comm, small_classification, monkeypatch, bound):
    """With one straggling worker, every gradient the servers applied was at most `bound` updates
    stale; the others run ahead to the bound, and every worker computes every step."""
    need_ranks(comm, 1)
    slow_down(monkeypatch, comm, ms=10)
    steps = 20
    summary = train(config(data=small_classification, steps=steps, staleness=bound), comm).history[-1]
    workers = comm.size - 1
    assert summary["max_staleness"] <= bound
    assert len(summary["staleness_counts"]) - 1 == summary["max_staleness"]
    assert sum(summary["staleness_counts"]) == steps * workers
    assert summary["updates_per_worker"] == [steps] * workers
    if workers > 1:
        assert summary["max_staleness"] == bound, summary


def test_async_lets_fast_workers_do_more(comm, small_classification, monkeypatch):
    """Async spends steps x W gradients in all; with a straggler the fast workers compute most of them."""
    need_ranks(comm, 1)
    slow_down(monkeypatch, comm, ms=10)
    steps = 20
    summary = train(config(data=small_classification, steps=steps, ps_mode="async"), comm).history[-1]
    workers = comm.size - 1
    updates = summary["updates_per_worker"]
    assert sum(updates) == sum(summary["staleness_counts"]) == steps * workers
    if workers > 1:
        assert updates[0] < min(updates[1:]), updates
        assert summary["max_staleness"] >= 1


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_server_reports_the_gradient_slots_it_holds(comm, small_classification, mode):
    """Sync mode receives each worker's gradient into a slot of its own and, at --staleness 0,
    holds a step's W slots until the last arrives: a server's gradients are its sum and W slots.
    Async mode receives into the sum. One server holds all of θ, so it is the busiest rank."""
    need_ranks(comm, 1)
    run_config = config(data=small_classification, steps=3, ps_mode=mode)
    record = train(run_config, comm).history[-1]
    share = sum(dense_param_counts(parse_widths(run_config.model))) * np.dtype(run_config.dtype).itemsize
    slots = comm.size - 1 if mode == "sync" else 0
    assert record["grad_bytes_per_rank"] == (1 + slots) * share


def test_metrics_report_the_servers_counts(comm, small_classification, shared_dir):
    """The last JSONL record carries the servers' per-worker counts and staleness."""
    need_ranks(comm, 1)
    path = os.path.join(shared_dir, "metrics.jsonl")
    train(config(data=small_classification, epochs=2, metrics=path, ps_mode="async"), comm)
    comm.Barrier()
    records = [json.loads(line) for line in open(path)]
    final = records[-1]
    assert final["final"] is True
    assert len(final["updates_per_worker"]) == final["workers"] == comm.size - 1
    assert final["servers"] == 1 and final["ps_mode"] == "async"
    assert final["max_staleness"] == len(final["staleness_counts"]) - 1
    assert "final_val_accuracy" in final and "loss" in records[0]


# ---------------------------------------------------------------------------- layouts and failures


def test_a_job_of_one_rank_is_refused(comm, small_classification):
    with pytest.raises(MpitrainError, match=r"--sync ps needs at least 2 ranks .* has 1"):
        train(config(data=small_classification), MPI.COMM_SELF)


def test_servers_must_leave_a_worker(comm, small_classification):
    expected = "needs at least 2 ranks" if comm.size == 1 else f"--servers {comm.size} leaves no worker"
    with pytest.raises(MpitrainError, match=expected):
        train(config(data=small_classification, servers=comm.size), comm)


def test_staleness_needs_sync_mode(comm, small_classification):
    with pytest.raises(MpitrainError, match="--staleness 2 bounds --ps-mode sync"):
        train(config(data=small_classification, ps_mode="async", staleness=2), comm)


def test_bad_layout_prints_one_line_and_exits_2(comm, small_classification):
    argv = mpitrain_argv(2, "train", "--no-progress", "--device", "cpu", "--data", small_classification,
                         "--model", "12-16-3", "--sync", "ps", "--servers", "2")
    done = run_on_root_politely(comm, argv, timeout=60)
    lines = [line for line in (done["stdout"] + done["stderr"]).splitlines() if line.strip()]
    assert done["returncode"] == 2, done
    assert lines == ["mpitrain: error: --servers 2 leaves no worker in a job of 2 ranks: use at most 1"], lines


FAILING = """
import sys
from mpi4py import MPI
import {module} as target
if MPI.COMM_WORLD.rank == {rank}:
    calls = []
    original = target.{cls}.{method}
    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("rank {rank} fails on purpose")
        return original(*args, **kwargs)
    target.{cls}.{method} = failing
from mpitrain.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("role,rank,module,cls,method", [
    ("worker", 1, "mpitrain.nn.model", "Model", "backward"),
    ("server", 2, "mpitrain.optim", "SGD", "step"),
])
def test_a_failing_rank_ends_the_job(comm, small_classification, role, rank, module, cls, method):
    """A worker or a server raising mid-run ends the 3-rank job, non-zero, with its message, within seconds."""
    script = FAILING.format(module=module, cls=cls, method=method, rank=rank)
    argv = mpitrain_argv(3, "train", "--no-progress", "--device", "cpu", "--data", small_classification,
                         "--model", "12-16-3", "--optimizer", "sgd", "--sync", "ps", "--steps", "50")
    argv = argv[: argv.index("-m")] + ["-c", script] + argv[argv.index("mpitrain") + 1:]
    started = time.monotonic()
    done = run_on_root_politely(comm, argv, timeout=60)
    elapsed = time.monotonic() - started
    assert done["returncode"] not in (0, None), done
    assert f"rank {rank} fails on purpose" in done["stderr"], done
    assert f"[rank {rank}]" in done["stderr"]
    assert elapsed < 20


def test_preset_prints_theta_and_exits_cleanly(comm):
    """`mpirun -n 3 mpitrain train --preset linreg-ps`: exit 0, a `theta = [a, b]` line near (2, 3)."""
    argv = mpitrain_argv(3, "train", "--preset", "linreg-ps", "--no-progress")
    done = run_on_root_politely(comm, argv, timeout=120)
    assert done["returncode"] == 0, done
    lines = [line for line in done["stdout"].splitlines() if line.startswith("theta = ")]
    assert len(lines) == 1 and re.fullmatch(r"theta = \[-?\d+\.\d+, -?\d+\.\d+\]", lines[0]), done["stdout"]
    theta = [float(v) for v in lines[0][len("theta = ["):-1].split(",")]
    np.testing.assert_allclose(theta, [2.0, 3.0], atol=0.1)
