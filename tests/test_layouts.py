"""Every capability of the loop in every layout: checkpoint and bit-identical resume, a signal's
agreed stop, --on-nan skip and abort, --init-from a checkpoint, resume across layouts and world
sizes, a non-finite input row, and gradient buckets in grid layouts.

Layouts are (dp, tp, pp) on the first dp*tp*pp ranks of the test's communicator; a layout that
needs more ranks than the world has skips. Expected values come from the same layout run without
the interruption, or from the one-process run (tests/parallel_runs.py).
"""

import os
import signal

import numpy as np
import pytest

from contextlib import contextmanager

from mpi4py import MPI

from harness import write_on_root
from mpitrain.checkpoint import checkpoint_name
from mpitrain.data import synth
from mpitrain.errors import MpitrainError
from mpitrain.parallel.stage import Stage
from mpitrain.preempt import Preempted
from mpitrain.train import train
from parallel_runs import RTOL, config, serial_run

# name: (ranks, config overrides). Parameter-server layouts: 2 workers and 1 server.
LAYOUTS = {"dp": (2, {}), "tp": (2, {"tp": 2}), "pp": (2, {"pp": 2, "micro_batches": 2}),
           "tp-pp": (4, {"tp": 2, "pp": 2, "micro_batches": 2}), "ps-sync": (3, {"sync": "ps"}),
           "ps-async": (3, {"sync": "ps", "ps_mode": "async"})}
ALL_LAYOUTS = {"one": (1, {}), **{k: v for k, v in LAYOUTS.items() if k != "ps-async"}, "dp-tp": (4, {"tp": 2}),
               "tp4": (4, {"tp": 4})}
# Where a resume repeats the run bit for bit: not async, whose gradients meet θ in timing order.
EXACT = [name for name in LAYOUTS if name != "ps-async"]


@contextmanager
def groups_of(comm, size: int):
    """The first `size` ranks of comm as a communicator (None on the others): one job per test, so
    runs that write files never share a folder. Skips when comm is smaller. Collective on comm."""
    if comm.size < size:
        pytest.skip(f"needs {size} ranks; this world has {comm.size}")
    group = comm.Split(0 if comm.rank < size else MPI.UNDEFINED, key=comm.rank)
    try:
        yield None if group == MPI.COMM_NULL else group
    finally:
        if group != MPI.COMM_NULL:
            group.Free()


def layout_config(layout, **overrides):
    return config(**{**layout[1], **overrides})


def run(comm, layout, **overrides):
    """Train under `layout` on the first ranks of comm; the result there, None on the others."""
    with groups_of(comm, layout[0]) as group:
        if group is None:
            return None
        return train(layout_config(layout, **overrides), group)


def assert_identical(got, expected):
    if got is None:
        return
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def assert_close(got, expected):
    if got is None or expected is None:
        return
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=RTOL, atol=RTOL * np.abs(value).max(), err_msg=name)


# ---------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("name", EXACT)
def test_resume_from_a_checkpoint_is_bit_identical(comm, small_classification, shared_dir, name):
    layout, first = LAYOUTS[name], os.path.join(shared_dir, "first")
    full = run(comm, layout, data=small_classification, steps=8, checkpoint_dir=first, checkpoint_every=4)
    resumed = run(comm, layout, data=small_classification, steps=8, checkpoint_dir=os.path.join(shared_dir, "again"),
                  resume=os.path.join(first, checkpoint_name(4)))
    if full is not None:
        assert_identical(resumed.parameters, full.parameters)
        assert resumed.history[-1]["val_loss"] == full.history[-1]["val_loss"]
        # The partial epoch's loss sums travel in the checkpoint (the parameter server's do not yet).
        if not name.startswith("ps"):
            assert resumed.history[-1]["loss"] == full.history[-1]["loss"]


@pytest.mark.parametrize("name", LAYOUTS)
def test_a_signal_stops_every_rank_at_a_checkpoint_and_resume_repeats_the_run(comm, small_classification,
                                                                              shared_dir, monkeypatch, name):
    """Rank 0 receives SIGUSR1 during its first step: every rank stops at one step with a checkpoint, and
    the resumed run ends where an uninterrupted one does (bit for bit where the layout repeats)."""
    layout, ck = LAYOUTS[name], os.path.join(shared_dir, "ck")
    full = run(comm, layout, data=small_classification, steps=8)
    stopped = None
    with groups_of(comm, layout[0]) as group:
        if group is not None:
            during_step(monkeypatch, group, 1, lambda: os.kill(os.getpid(), signal.SIGUSR1))
            try:
                train(layout_config(layout, data=small_classification, steps=8, checkpoint_dir=ck), group)
            except Preempted as exc:
                stopped = exc
            monkeypatch.undo()
    resumed = run(comm, layout, data=small_classification, steps=8, checkpoint_dir=ck, resume="auto")
    if full is not None:
        assert stopped is not None and 1 <= stopped.step < 8 and stopped.path.endswith(checkpoint_name(stopped.step))
        assert resumed.history[-1]["step"] == 8
        if name in EXACT:
            assert_identical(resumed.parameters, full.parameters)


def during_step(monkeypatch, comm, step: int, action) -> None:
    """Rank 0 of comm (a worker in every layout) runs action() in its `step`-th forward/backward."""
    forward_backward, calls = Stage.forward_backward, {"n": 0}

    def patched(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step and comm.rank == 0:
            action()
        return forward_backward(self, *args, **kwargs)

    monkeypatch.setattr(Stage, "forward_backward", patched)


def poison_step(monkeypatch, comm, step: int):
    """Rank 0 of comm computes a NaN loss and gradient in `step` (counted from 1)."""
    forward_backward, calls = Stage.forward_backward, {"n": 0}

    def poisoned(self, *args, **kwargs):
        loss = forward_backward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == step and comm.rank == 0:
            self.model.grads[0] = float("nan")
            return float("nan")
        return loss

    monkeypatch.setattr(Stage, "forward_backward", poisoned)


@pytest.mark.parametrize("name", LAYOUTS)
def test_on_nan_skip_drops_the_step_on_every_rank(comm, small_classification, monkeypatch, name):
    layout = LAYOUTS[name]
    with groups_of(comm, layout[0]) as group:
        if group is None:
            return
        # The first step: an asynchronous worker may compute no other (another takes the gradients).
        poison_step(monkeypatch, group, 1)
        result = train(layout_config(layout, data=small_classification, steps=6, on_nan="skip"), group)
    assert result.history[-1]["skipped_steps"] == 1
    assert all(np.isfinite(value).all() for value in result.parameters.values())


@pytest.mark.parametrize("name", LAYOUTS)
def test_on_nan_abort_stops_every_rank_naming_the_step(comm, small_classification, monkeypatch, name):
    layout = LAYOUTS[name]
    with groups_of(comm, layout[0]) as group:
        if group is None:
            return
        poison_step(monkeypatch, group, 1)
        # An asynchronous gradient's step is the updates applied when it arrives, which timing decides.
        step = r"\d+" if name == "ps-async" else "1"
        with pytest.raises(MpitrainError, match=rf"step {step}: NaN or Inf in the (loss on rank\(s\) 0|all-reduced gradient|gradient of worker 0)"):
            train(layout_config(layout, data=small_classification, steps=6, on_nan="abort"), group)


@pytest.mark.parametrize("name", LAYOUTS)
def test_init_from_a_checkpoint_starts_from_its_parameters(comm, small_classification, shared_dir, name):
    ck = os.path.join(shared_dir, "serial")
    written = serial_run(data=small_classification, steps=3, checkpoint_dir=ck) if comm.rank == 0 else None
    comm.Barrier()
    expected = comm.bcast(written.parameters if written else None, root=0)
    started = run(comm, LAYOUTS[name], data=small_classification, steps=0,
                  init_from=os.path.join(ck, checkpoint_name(3)))
    assert_identical(started.parameters if started else None, expected)


# ---------------------------------------------------------------------------- across layouts


@pytest.mark.parametrize("reader", ALL_LAYOUTS)
@pytest.mark.parametrize("writer", ALL_LAYOUTS)
def test_a_checkpoint_resumes_under_any_other_layout(comm, small_classification, shared_dir, writer, reader):
    """Written by `writer` at step 4, resumed by `reader` to step 8: the uninterrupted one-process
    run's parameters to 1e-10 (float64, --sampler global), Adam moments and step count included."""
    ck = os.path.join(shared_dir, "ck")
    run(comm, ALL_LAYOUTS[writer], data=small_classification, steps=4, checkpoint_dir=ck)
    comm.Barrier()
    resumed = run(comm, ALL_LAYOUTS[reader], data=small_classification, steps=8, checkpoint_dir=ck, resume="auto")
    expected = serial_run(data=small_classification, steps=8)
    assert_close(resumed.parameters if resumed else None, expected.parameters)


@pytest.mark.parametrize("writer,reader", [("dp", "tp-pp"), ("tp", "ps-sync"), ("ps-sync", "pp")])
def test_sgd_momentum_resumes_across_layouts(comm, small_classification, shared_dir, writer, reader):
    """The momentum buffer is resharded like Adam's moments: 1e-10 of the uninterrupted run."""
    ck, sgd = os.path.join(shared_dir, "ck"), dict(optimizer="sgd", momentum=0.9, lr=0.05)
    run(comm, ALL_LAYOUTS[writer], data=small_classification, steps=4, checkpoint_dir=ck, **sgd)
    comm.Barrier()
    resumed = run(comm, ALL_LAYOUTS[reader], data=small_classification, steps=8, checkpoint_dir=ck, resume="auto",
                  **sgd)
    expected = serial_run(data=small_classification, steps=8, **sgd)
    assert_close(resumed.parameters if resumed else None, expected.parameters)


# ---------------------------------------------------------------------------- data faults and buckets


@pytest.fixture
def inf_row(comm, shared_dir):
    """The 480-row set with an Inf in row 101 of its second shard file (of two)."""
    x, y = synth.make_classification(480, 12, 3, seed=3)
    x[240 + 101, 4] = np.inf
    path = write_on_root(comm, os.path.join(shared_dir, "inf"), x, y, shards=2)
    return path


@pytest.mark.parametrize("sampler", ["shard", "global"])
@pytest.mark.parametrize("name", ["one", *LAYOUTS])
def test_an_inf_input_row_stops_every_rank_naming_file_and_row(comm, inf_row, name, sampler):
    layout = {**ALL_LAYOUTS, **LAYOUTS}[name]
    with groups_of(comm, layout[0]) as group:
        if group is None:
            return
        # val_fraction 0: the row is a training row, found where it is read (global: during an epoch).
        with pytest.raises(MpitrainError, match=r"part-00001\.h5: row 101 of dataset 'x' holds NaN or Inf"):
            train(layout_config(layout, data=inf_row, sampler=sampler, val_fraction=0.0, steps=None, epochs=2), group)


def test_buckets_and_overlap_in_a_grid_layout_equal_one_flat_sum(comm, small_classification):
    """dp 2 x tp 2: many small buckets overlapped with backward vs one bucket after it."""
    layout = ALL_LAYOUTS["dp-tp"]
    bucketed = run(comm, layout, data=small_classification, steps=6, bucket_mb=1e-4, overlap=True)
    flat = run(comm, layout, data=small_classification, steps=6, bucket_mb=1e3, overlap=False)
    assert_close(bucketed.parameters if bucketed else None, flat.parameters if flat else None)




# ---------------------------------------------------------------------------- metrics and jobs

RECORD_FIELDS = {"epoch", "step", "loss", "val_loss", "samples_per_s", "world_size", "skipped_steps", "dp", "tp", "pp",
                 "micro_batches", "bubble_fraction", "pipeline_wait_fraction", "tp_bytes_per_step",
                 "pp_bytes_per_step", "dp_bytes_per_step", "sent_bytes_per_step", "param_bytes_per_rank",
                 "grad_bytes_per_rank", "optimizer_bytes_per_rank", "activation_bytes_per_rank"}


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_layout_reports_the_same_record_fields(comm, small_classification, name):
    result = run(comm, LAYOUTS[name], data=small_classification, steps=4)
    if result is not None:
        for record in result.history:
            assert RECORD_FIELDS <= record.keys(), sorted(RECORD_FIELDS - record.keys())
        assert result.history[-1]["optimizer_bytes_per_rank"] > 0 and result.history[-1]["sent_bytes_per_step"] > 0


@pytest.mark.parametrize("algorithm", ["ring", "rd", "mpi", "hier"])
def test_gradient_bytes_are_what_the_algorithm_sends(comm, small_classification, algorithm):
    """dp 2: a ring sends every bucket once around (all but one's own chunk, then one's own), recursive
    doubling the whole bucket in its one round, MPI is counted as 2(p-1)/p of it: each the size of
    the gradient. The hierarchical all-reduce of two ranks on one node sums in shared memory: 0 bytes."""
    result = run(comm, LAYOUTS["dp"], data=small_classification, steps=3, allreduce=algorithm, bucket_mb=1e-4)
    if result is not None:
        gradient_bytes = 8 * sum(value.size for value in result.parameters.values())
        expected = 0 if algorithm == "hier" else gradient_bytes
        assert result.history[-1]["dp_bytes_per_step"] == expected


JOB_LAYOUTS = {"tp": (2, ["--tp", "2"]), "ps-sync": (3, ["--sync", "ps"]),
               "ps-async": (3, ["--sync", "ps", "--ps-mode", "async"])}


@pytest.mark.parametrize("name", JOB_LAYOUTS)
def test_a_signalled_job_exits_75_and_resumes(comm, small_classification, shared_dir, name):
    """`mpirun -n W mpitrain train` with SIGUSR1 to rank 0 in its first step (the only one an
    asynchronous worker is sure to compute): exit 75 with a checkpoint;
    `--resume auto` finishes (exit 0), on the uninterrupted run's bits where the layout repeats."""
    from harness import mpitrain_argv, run_on_root

    folder, reference, resumed = (os.path.join(shared_dir, n) for n in ("ck", "reference.h5", "resumed.h5"))
    ranks, flags = JOB_LAYOUTS[name]
    args = ["train", "--data", small_classification, "--model", "12-10-9-7-3", "--batch-size", "12", "--steps", "12",
            "--dtype", "float64", "--sampler", "global", "--device", "cpu", "--no-progress", "--seed", "5",
            *flags]
    faults = os.path.join(os.path.dirname(__file__), "faults.py")
    signalled = mpitrain_argv(ranks, *args, "--checkpoint-dir", folder)
    at = signalled.index("-m")
    signalled = signalled[:at] + [faults, "signal", "1", "0", "--"] + signalled[at + 2:]
    runs = [run_on_root(comm, mpitrain_argv(ranks, *args, "--save", reference), timeout=90),
            run_on_root(comm, signalled, timeout=90),
            run_on_root(comm, mpitrain_argv(ranks, *args, "--checkpoint-dir", folder, "--resume", "auto",
                                            "--save", resumed), timeout=90)]
    assert runs[0]["returncode"] == 0, runs[0]
    assert runs[1]["returncode"] == 75 and "preempted by SIGUSR1 on rank(s) 0" in runs[1]["stderr"], runs[1]
    assert runs[2]["returncode"] == 0 and "resumed from" in runs[2]["stdout"], runs[2]
    if name != "ps-async" and comm.rank == 0:
        from mpitrain.checkpoint import load_parameters

        assert_identical(load_parameters(resumed), load_parameters(reference))


def test_an_inf_row_read_by_a_tensor_parallel_job_exits_2_naming_file_and_row(comm, inf_row):
    from harness import mpitrain_argv, run_on_root

    done = run_on_root(comm, mpitrain_argv(2, "train", "--data", inf_row, "--model", "12-10-9-7-3", "--tp", "2",
                                           "--sampler", "global", "--val-fraction", "0", "--epochs", "2",
                                           "--batch-size", "12", "--device", "cpu", "--no-progress"), timeout=90)
    assert done["returncode"] == 2, done
    lines = [line for line in done["stderr"].splitlines() if line.startswith("mpitrain: error:")]
    assert len(lines) == 1 and "part-00001.h5: row 101 of dataset 'x' holds NaN or Inf" in lines[0], done


# ---------------------------------------------------------------------------- parameter-server details


def test_three_sync_workers_sum_in_worker_order_so_runs_repeat_bit_for_bit(comm, small_classification):
    layout = (4, {"sync": "ps"})  # 3 workers, 1 server
    first = run(comm, layout, data=small_classification, steps=6)
    second = run(comm, layout, data=small_classification, steps=6)
    if first is not None:
        assert_identical(second.parameters, first.parameters)


def test_a_signal_at_a_server_other_than_server_0_stops_the_run(comm, small_classification, shared_dir, monkeypatch):
    """--servers 2: the second server receives SIGUSR1; every rank stops with a checkpoint."""
    from mpitrain.parallel.ps_server import Server

    layout = (4, {"sync": "ps", "servers": 2})
    probe, calls = Server.probe, {"n": 0}

    def probing(self):
        calls["n"] += 1
        if calls["n"] == 3 and self.roles.server_index == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return probe(self)

    stopped = None
    with groups_of(comm, layout[0]) as group:
        if group is not None:
            monkeypatch.setattr(Server, "probe", probing)
            try:
                train(layout_config(layout, data=small_classification, steps=40,
                                    checkpoint_dir=os.path.join(shared_dir, "ck")), group)
            except Preempted as exc:
                stopped = exc
    if comm.rank < layout[0]:
        assert stopped is not None and stopped.step < 40 and "SIGUSR1 on rank(s) 3" in str(stopped)


def test_a_resumed_parameter_server_run_goes_on_counting_epochs_and_skips(comm, small_classification, shared_dir,
                                                                           monkeypatch):
    layout, ck = LAYOUTS["ps-sync"], os.path.join(shared_dir, "ck")
    with groups_of(comm, layout[0]) as group:
        if group is None:
            return
        poison_step(monkeypatch, group, 1)
        full = train(layout_config(layout, data=small_classification, steps=80, on_nan="skip", checkpoint_dir=ck,
                                   checkpoint_every=40), group)
        monkeypatch.undo()
        resumed = train(layout_config(layout, data=small_classification, steps=80, on_nan="skip",
                                      checkpoint_dir=os.path.join(shared_dir, "again"),
                                      resume=os.path.join(ck, checkpoint_name(40))), group)
    assert full.history[-1]["skipped_steps"] == resumed.history[-1]["skipped_steps"] == 1
    assert [r["epoch"] for r in resumed.history] == [r["epoch"] for r in full.history][-len(resumed.history):]
    assert_identical(resumed.parameters, full.parameters)
