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
ALL_LAYOUTS = {"one": (1, {}), **{k: v for k, v in LAYOUTS.items() if k != "ps-async"}, "dp-tp": (4, {"tp": 2})}
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
        # The resumed epoch's loss covers only the steps after the checkpoint (issue 12, kind 8).
        assert resumed.history[-1]["val_loss"] == full.history[-1]["val_loss"]


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
        with pytest.raises(MpitrainError, match=r"step 1: NaN or Inf in the (loss on rank\(s\) 0|all-reduced gradient|gradient of worker 0)"):
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


