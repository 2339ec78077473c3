"""The MLP trained under every (DP, TP, PP) layout equals the one-process run; one model file for all."""

import json
import os

import numpy as np
import pytest

from mpitrain.checkpoint import load_parameters, save_parameters
from mpitrain.errors import MpitrainError
from mpitrain.nn.model import Model
from mpitrain.train import train
from parallel_runs import MODEL, assert_same_run, config, layout_run, serial_run

# Every layout of four ranks, then those of two and of one.
LAYOUTS = [(4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2), (1, 1, 4), (2, 1, 1), (1, 2, 1), (1, 1, 2),
           (1, 1, 1)]
WIDTHS = [int(w) for w in MODEL.split("-")]


def write_on_root(comm, path, named):
    if comm.rank == 0:
        save_parameters(path, named)
    comm.Barrier()
    return path


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: "dp%d-tp%d-pp%d" % layout)
def test_ten_steps_equal_the_one_process_run(comm, small_classification, layout):
    """10 Adam steps in float64: parameters and reported losses within 1e-10 of one process."""
    settings = dict(data=small_classification, steps=10, micro_batches=2 if layout[2] > 1 else 1)
    expected = serial_run(**settings)
    initial = serial_run(**{**settings, "steps": 0})
    assert any(not np.allclose(initial.parameters[k], v) for k, v in expected.parameters.items()), "nothing trained"
    assert_same_run(layout_run(comm, layout, **settings), expected)


@pytest.mark.parametrize("layout", [(2, 2, 1), (1, 2, 2), (1, 1, 2)], ids=lambda layout: "dp%d-tp%d-pp%d" % layout)
def test_save_writes_the_data_parallel_file(comm, small_classification, shared_dir, layout):
    """--save under a sliced layout writes the names, shapes and values of the one-process file."""
    serial_path = os.path.join(shared_dir, f"serial-{comm.rank}.h5")
    sliced_path = os.path.join(shared_dir, "sliced.h5")
    serial_run(data=small_classification, steps=3, save=serial_path)
    layout_run(comm, layout, data=small_classification, steps=3, save=sliced_path)
    comm.Barrier()
    if comm.size < np.prod(layout):
        return
    expected, saved = load_parameters(serial_path), load_parameters(sliced_path)
    assert saved.keys() == expected.keys() == set(Model(WIDTHS, dtype=np.float64).state())
    for name, value in expected.items():
        assert saved[name].shape == value.shape and saved[name].dtype == value.dtype
        np.testing.assert_allclose(saved[name], value, rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("layout", [(1, 1, 1), (2, 2, 1), (1, 2, 2), (1, 4, 1)],
                         ids=lambda layout: "dp%d-tp%d-pp%d" % layout)
def test_init_from_loads_a_file_into_any_layout(comm, small_classification, shared_dir, layout):
    """A file of arbitrary parameters, loaded under the layout and trained 4 steps, equals the
    one-process run started from the same file; with 0 steps the file comes back unchanged."""
    path = os.path.join(shared_dir, "start.h5")
    rng = np.random.default_rng(11)
    start = {name: rng.standard_normal(value.shape) for name, value in Model(WIDTHS, dtype=np.float64).state().items()}
    write_on_root(comm, path, start)
    untouched = layout_run(comm, layout, data=small_classification, steps=0, init_from=path)
    expected = serial_run(data=small_classification, steps=4, init_from=path)
    assert_same_run(layout_run(comm, layout, data=small_classification, steps=4, init_from=path), expected)
    if untouched is not None:
        for name, value in start.items():
            np.testing.assert_array_equal(untouched.parameters[name], value)


def test_init_from_a_file_of_another_model_fails_on_every_rank(comm, small_classification, shared_dir):
    path = write_on_root(comm, os.path.join(shared_dir, "other.h5"), Model([12, 5, 3], dtype=np.float64).state())
    for tp in (1, comm.size):
        with pytest.raises(MpitrainError, match=r"other\.h5: '0/weight' has shape \(12, 5\) but --model 12-10-9-7-3 needs \(12, 10\)"):
            train(config(data=small_classification, tp=tp, init_from=path), comm)


def test_metrics_report_the_layout_bubble_and_traffic(comm, small_classification, shared_dir):
    path = os.path.join(shared_dir, "metrics.jsonl")
    layout = (1, 2, 2) if comm.size >= 4 else (1, 1, comm.size)
    result = layout_run(comm, layout, data=small_classification, steps=4, micro_batches=3, metrics=path)
    comm.Barrier()
    if result is None:
        return
    record = result.history[-1]
    assert (record["dp"], record["tp"], record["pp"], record["micro_batches"]) == (*layout, 3)
    assert record["bubble_fraction"] == pytest.approx((layout[2] - 1) / (3 + layout[2] - 1))
    assert record["param_bytes_per_rank"] > 0 and record["activation_bytes_per_rank"] > 0
    assert (record["pp_bytes_per_step"] > 0) == (layout[2] > 1)
    assert (record["tp_bytes_per_step"] > 0) == (layout[1] > 1)
    assert record["sent_bytes_per_step"] >= max(record[f"{k}_bytes_per_step"] for k in ("tp", "pp", "dp"))
    if comm.rank == 0:
        lines = [json.loads(line) for line in open(path)]
        assert lines[-1]["final"] and lines[-1]["bubble_fraction"] == record["bubble_fraction"]


def test_every_rank_returns_the_same_full_parameters(comm, small_classification):
    result = train(config(data=small_classification, tp=comm.size, steps=2), comm)
    flat = np.concatenate([value.ravel() for value in result.parameters.values()])
    gathered = comm.allgather(flat)
    np.testing.assert_array_equal(gathered[comm.rank], gathered[0])
