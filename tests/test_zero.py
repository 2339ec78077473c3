"""--zero 1 and 2: the parameters of --zero 0 after 20 Adam and 20 SGD-momentum steps (float64, 1e-10
relative, against the one-process run) on 1, 2 and 4 ranks and in grid layouts, with every
--allreduce algorithm; optimizer state per rank 1/dp; the checkpoint is the file --zero 0 writes, and
it resumes across zero stages and world sizes.

Layouts are (ranks, overrides) on the first ranks of the test's communicator; a layout that needs
more ranks than the world has skips. The model 12-8-8-8-8-8-8-3 has 491 parameters, so each rank's
shard starts and stops inside layers and rows; --bucket-mb 1e-4 makes each layer a bucket, so a
bucket holds parts of several ranks' shards, and its equal layers let --zero 2 keep two one-layer
staging slots and the shard instead of the whole gradient.
"""

import os
import time

import h5py
import numpy as np
import pytest

from mpitrain.backend import select_backend
from mpitrain.checkpoint import checkpoint_name
from mpitrain.comm.ring import chunk_bounds
from mpitrain.nn.model import Model, parse_widths
from mpitrain.parallel.state import range_pieces, write_piece
from mpitrain.parallel.strategy import GridStrategy
from mpitrain.train import train
from parallel_runs import RTOL, config, serial_run
from test_layouts import assert_close, groups_of

LAYOUTS = {"one": (1, {}), "dp2": (2, {}), "dp4": (4, {}), "dp2-tp2": (4, {"tp": 2}), "dp2-pp2": (4, {"pp": 2})}
SGD = dict(optimizer="sgd", momentum=0.9, lr=0.05)
SETTINGS = dict(bucket_mb=1e-4, model="12-8-8-8-8-8-8-3")


def run(comm, layout, **overrides):
    """Train under `layout` on its first ranks of comm; the result there, None on the others."""
    ranks, settings = layout
    with groups_of(comm, ranks) as group:
        return None if group is None else train(config(**{**settings, **SETTINGS, **overrides}), group)


@pytest.mark.parametrize("name", LAYOUTS)
def test_zero_stages_give_the_one_process_parameters(comm, small_classification, name):
    """20 Adam steps and 20 SGD-momentum steps under --zero 1 and 2: the one-process run's parameters."""
    for optimizer in (dict(optimizer="adam"), SGD):
        expected = serial_run(data=small_classification, model=SETTINGS["model"], steps=20, **optimizer)
        for zero in (1, 2):
            result = run(comm, LAYOUTS[name], data=small_classification, steps=20, zero=zero, **optimizer)
            assert_close(result.parameters if result else None, expected.parameters)


@pytest.mark.parametrize("algorithm", ["ring", "mpi", "hier", "rd", "auto"])
def test_every_allreduce_algorithm_shards_alike(comm, small_classification, algorithm):
    """dp 2 (and dp 4 where the world has 4 ranks) with each --allreduce, --zero 1 with overlap and
    --zero 2 without (its staging slots then wait for whole buckets): the one-process parameters."""
    expected = serial_run(data=small_classification, model=SETTINGS["model"], steps=6)
    for layout in (LAYOUTS["dp2"], LAYOUTS["dp4"] if comm.size >= 4 else LAYOUTS["dp2"]):
        for zero, overlap in ((1, True), (2, False)):
            result = run(comm, layout, data=small_classification, steps=6, zero=zero, overlap=overlap,
                         allreduce=algorithm)
            assert_close(result.parameters if result else None, expected.parameters)


@pytest.mark.parametrize("zero", [1, 2])
def test_the_next_forward_reads_each_layer_once_its_parameters_are_gathered(comm, zero):
    """--zero starts the parameter all-gather at the update; the next forward waits for each layer's
    buckets just before that layer, in forward order (under --zero 2 with --bucket-mb 1e-4 every
    layer is cut into pieces of rows, so a layer spans several). The last rank starts its forwards late,
    so the others' gathers cannot finish on their own before they need them: a layer read before its
    wait finished would hold its previous values, not the ones every rank ends the forward with."""
    with groups_of(comm, min(comm.size, 4)) as group:
        if group is None:
            return
        if group.size < 2:
            pytest.skip("needs 2 ranks: one rank all-gathers nothing")
        settings = config(**SETTINGS, zero=zero)
        strategy = GridStrategy(settings, group, parse_widths(settings.model), select_backend("cpu", group))
        slices = strategy.model.layer_grad_slices()
        ready, seen = strategy.grad_sync.parameters_ready, []

        def read_after_wait(layer):
            ready(layer)
            seen.append((layer, strategy.model.params[slices[layer][0]:slices[layer][1]].copy()))

        strategy.grad_sync.parameters_ready = read_after_wait
        rng = np.random.default_rng(group.rank)
        for step in range(4):
            if group.rank == group.size - 1 and step:
                time.sleep(0.2)
            seen.clear()
            strategy.forward_backward(rng.standard_normal((6, 12)), rng.integers(0, 3, 6))
            assert [layer for layer, _ in seen] == list(range(len(slices)))
            for layer, values in seen:
                np.testing.assert_array_equal(values, strategy.model.params[slices[layer][0]:slices[layer][1]])
            strategy.update(0.05)
        strategy.close()
        final = strategy.model.params
        assert group.allgather(final.tobytes()) == [final.tobytes()] * group.size


@pytest.mark.parametrize("name", ["dp2", "dp4", "dp2-tp2"])
def test_optimizer_state_per_rank_is_one_dp_th_and_traffic_is_unchanged(comm, small_classification, name):
    """Adam's two moments: the busiest rank holds the largest equal block of the --zero 0 figure.
    Gradient bytes per step: a reduce-scatter plus an all-gather send what the ring all-reduce sends.
    Gradient memory: the whole buffer under --zero 1, less under --zero 2."""
    ranks, settings = LAYOUTS[name]
    dp = ranks // settings.get("tp", 1)
    base = run(comm, LAYOUTS[name], data=small_classification, steps=2, allreduce="ring")
    for zero in (1, 2):
        sharded = run(comm, LAYOUTS[name], data=small_classification, steps=2, allreduce="ring", zero=zero)
        if base is None:
            continue
        whole, mine = base.history[-1], sharded.history[-1]
        entries = whole["optimizer_bytes_per_rank"] // (2 * 8)
        largest_block = max(stop - start for start, stop in chunk_bounds(entries, dp))
        assert mine["optimizer_bytes_per_rank"] == 2 * 8 * largest_block
        assert mine["param_bytes_per_rank"] == whole["param_bytes_per_rank"]
        if zero == 1:
            assert mine["grad_bytes_per_rank"] == whole["grad_bytes_per_rank"]
        else:
            assert mine["grad_bytes_per_rank"] < whole["grad_bytes_per_rank"]
        assert mine["dp_bytes_per_step"] == pytest.approx(whole["dp_bytes_per_step"], rel=0.02)


def test_zero_2_cuts_a_layer_that_holds_most_of_the_model_into_pieces_of_rows(comm, small_classification):
    """12-64-3: the first layer holds 81 % of the 1027 parameters, so one staging slot of its size
    and the shard would be no smaller than the whole gradient; cut into pieces of whole rows (one
    row of 64 values per bucket at --bucket-mb 1e-4), each written by backward and reduce-scattered
    in turn, --zero 2 keeps two 64-value slots and the shard, and ends on the one-process run's
    parameters after 20 Adam steps, with and without overlap."""
    model = "12-64-3"
    expected = serial_run(data=small_classification, model=model, steps=20)
    for overlap in (True, False):
        result = run(comm, LAYOUTS["dp2"], data=small_classification, steps=20, zero=2, model=model,
                     overlap=overlap)
        assert_close(result.parameters if result else None, expected.parameters)
        if result is not None:
            assert result.history[-1]["grad_bytes_per_rank"] == (2 * 64 + (12 * 64 + 64 + 64 * 3 + 3 + 1) // 2) * 8


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_a_tensor_slice_with_no_parameters_trains(comm, small_classification, zero):
    """12-1-3 under --tp 2: one rank's slice of the 1-wide first layer holds no parameters (the
    forward's wait for a layer's parameters has no bucket to wait for there), with and without
    --zero: the one-process parameters after 6 steps."""
    expected = serial_run(data=small_classification, model="12-1-3", steps=6)
    layout = (2, {"tp": 2}) if zero == 0 else (4, {"tp": 2})
    result = run(comm, layout, data=small_classification, steps=6, zero=zero, model="12-1-3")
    assert_close(result.parameters if result else None, expected.parameters)


def test_range_pieces_of_unequal_ranges_rebuild_each_parameter():
    """Flat ranges that start and stop inside rows, cut into rectangles and laid into unsliced
    arrays, give every parameter, each entry once; the state views are the same entries."""
    widths = [5, 7, 6, 3]
    model = Model(widths, dtype=np.float64, seed=2)
    model.params[...] = np.arange(model.params.size)
    for cuts in ([0, 1, 40, 41, 95], [0, 7, 8, 50, 97]):
        bounds = list(zip(cuts, cuts[1:] + [model.params.size]))
        full = {name: np.full(value.shape, -1.0) for name, value in model.state().items()}
        for start, stop in bounds:
            state = {"m": model.params[start:stop] * 2}
            for name, key, views in range_pieces(model.shards(), widths, start, stop, model.params, state):
                np.testing.assert_array_equal(views["m"], 2 * views["param"])
                write_piece(full[name], key, views["param"])
        for name, value in model.state().items():
            np.testing.assert_array_equal(full[name], value, err_msg=name)


@pytest.mark.parametrize("writer,reader", [(("dp2", 1), ("one", 0)), (("one", 0), ("dp2", 2)),
                                           (("dp4", 2), ("dp2", 1)), (("dp2-tp2", 1), ("dp4", 0)),
                                           (("dp2", 0), ("dp2-pp2", 2)), (("dp2-pp2", 2), ("one", 0))])
def test_checkpoints_resume_across_zero_stages_and_world_sizes(comm, small_classification, shared_dir, writer, reader):
    """Written at step 4 by one (layout, stage), resumed to step 8 by another: the uninterrupted
    one-process run's parameters to 1e-10, Adam moments and step count included."""
    ck = os.path.join(shared_dir, "ck")
    (write_layout, write_zero), (read_layout, read_zero) = writer, reader
    run(comm, LAYOUTS[write_layout], data=small_classification, steps=4, checkpoint_dir=ck, zero=write_zero)
    comm.Barrier()
    resumed = run(comm, LAYOUTS[read_layout], data=small_classification, steps=8, checkpoint_dir=ck, resume="auto",
                  zero=read_zero)
    expected = serial_run(data=small_classification, model=SETTINGS["model"], steps=8)
    assert_close(resumed.parameters if resumed else None, expected.parameters)


def test_a_sharded_checkpoint_is_the_file_zero_0_writes(comm, small_classification, shared_dir):
    """Every dataset of the --zero 1 checkpoint equals the --zero 0 one's to 1e-10 (momentum included)."""
    folders = {zero: os.path.join(shared_dir, f"zero{zero}") for zero in (0, 1)}
    for zero, folder in folders.items():
        run(comm, LAYOUTS["dp2"], data=small_classification, steps=3, checkpoint_dir=folder, zero=zero, **SGD)
    if comm.rank == 0:
        files = {zero: h5py.File(os.path.join(folder, checkpoint_name(3)), "r") for zero, folder in folders.items()}
        names = []
        files[0].visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
        assert any(name.startswith("optimizer/velocity/") for name in names)
        for name in names:
            if name.startswith(("model/", "optimizer/")):
                expected = files[0][name][()]
                np.testing.assert_allclose(files[1][name][()], expected, rtol=RTOL,
                                           atol=RTOL * np.abs(expected).max(), err_msg=name)
        for handle in files.values():
            handle.close()


def test_zero_needs_the_allreduce_sync():
    from mpitrain.errors import MpitrainError

    with pytest.raises(MpitrainError, match="--zero 3"):
        config(zero=3)
    with pytest.raises(MpitrainError, match="--zero shards"):
        config(zero=1, sync="ps")
    with pytest.raises(MpitrainError, match="use --zero 1"):
        config(zero=2, pp=2, micro_batches=2)
