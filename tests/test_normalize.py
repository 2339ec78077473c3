"""--normalize: statistics over every rank's training rows equal NumPy's over all of them, whatever
the world size and sampler; rows are normalized as read; the statistics are saved with the model."""

import dataclasses
import os

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from groups import groups_of
from harness import write_on_root
from mpitrain.config import TrainConfig, validate
from mpitrain.data import normalize, partition
from mpitrain.data.rank import load_rank_data, open_dataset
from mpitrain.parallel.state import init_from, param_pieces
from mpitrain.nn.model import Model
from mpitrain.train import train

ROWS, FEATURES, CLASSES = 203, 6, 3
TOL = 1e-12  # float64: Chan's merge and NumPy's two passes differ by rounding only


def config(path, **overrides) -> TrainConfig:
    base = dict(data=path, model=f"{FEATURES}-5-{CLASSES}", batch_size=8, dtype="float64", device="cpu",
                progress=False, val_fraction=0.2, seed=1, steps=3)
    return validate(dataclasses.replace(TrainConfig(), **{**base, **overrides}))


@pytest.fixture
def raw_set(comm, shared_dir):
    """Features on very different scales and offsets, one of them constant; y (N,) classes."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((ROWS, FEATURES)) * np.array([1e-3, 1.0, 50.0, 1e4, 0.0, 3.0]) + np.arange(FEATURES) * 1e3
    y = rng.integers(CLASSES, size=ROWS)
    return write_on_root(comm, os.path.join(shared_dir, "raw.h5"), x, y), x, y


def expected_statistics(kind, x, settings):
    train_rows, _ = partition.split_validation(len(x), settings.val_fraction, settings.seed)
    rows = x[train_rows]
    if kind == "standard":
        shift, spread = rows.mean(axis=0), rows.std(axis=0)
    else:
        shift, spread = rows.min(axis=0), rows.max(axis=0) - rows.min(axis=0)
    return shift, np.where(spread > 0, spread, 1.0)


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("sampler,split", [("shard", "uniform"), ("shard", "stratified"), ("global", "uniform")])
@pytest.mark.parametrize("kind", ["standard", "minmax"])
def test_statistics_equal_numpy_over_all_training_rows(comm, raw_set, world, sampler, split, kind):
    path, x, _ = raw_set
    settings = config(path, normalize=kind, sampler=sampler, partition=split)
    shift, scale = expected_statistics(kind, x, settings)
    with groups_of(comm, world) as group:
        if group is None:
            return
        dataset = open_dataset(settings, [FEATURES, 5, CLASSES], group)
        data = load_rank_data(dataset, settings, CLASSES, group)
        norm = normalize.attached(settings)
        np.testing.assert_allclose(norm.shift, shift, rtol=TOL, atol=TOL * np.abs(shift).max())
        np.testing.assert_allclose(norm.scale, scale, rtol=TOL)
        # Rows in memory and rows read later are normalized alike: (x - shift) / scale.
        np.testing.assert_allclose(data.val_x, (x[data.val_rows] - shift) / scale, rtol=1e-9, atol=1e-9)
        if data.own_x is not None:
            np.testing.assert_allclose(data.own_x, (x[data.own_rows] - shift) / scale, rtol=1e-9, atol=1e-9)
        some = data.own_rows[:5]
        np.testing.assert_array_equal(dataset.read(some)[0], norm.apply(x[some]))
        dataset.close()


def test_statistics_are_saved_with_the_model_and_plain_loaders_ignore_them(comm, raw_set, shared_dir):
    path, x, _ = raw_set
    out = os.path.join(shared_dir, "model.h5")
    settings = config(path, normalize="standard", save=out)
    result = train(settings, comm)
    shift, scale = expected_statistics("standard", x, settings)
    with h5py.File(out, "r") as f:
        assert f.attrs["normalize"] == "standard"
        np.testing.assert_allclose(f["normalize/shift"][()], shift, rtol=TOL, atol=TOL * np.abs(shift).max())
        np.testing.assert_allclose(f["normalize/scale"][()], scale, rtol=TOL)
    model = Model([FEATURES, 5, CLASSES], dtype=np.float64)
    init_from(out, param_pieces(model), model.widths, comm)
    for name, value in result.parameters.items():
        np.testing.assert_array_equal(model.state()[name], value)


def test_normalized_training_matches_training_on_prenormalized_rows(comm, raw_set, shared_dir):
    """The normalization is applied before the model sees a row: training on raw rows with
    --normalize standard equals training on rows normalized beforehand (1e-9 relative)."""
    path, x, y = raw_set
    settings = config(path, normalize="standard", sampler="global")
    shift, scale = expected_statistics("standard", x, settings)
    pre = write_on_root(comm, os.path.join(shared_dir, "pre.h5"), (x - shift) / scale, y)
    got = train(settings, comm)
    expected = train(config(pre, sampler="global"), MPI.COMM_SELF)
    for name, value in expected.parameters.items():
        np.testing.assert_allclose(got.parameters[name], value, rtol=1e-9, atol=1e-12, err_msg=name)


def test_integer_inputs_are_converted_to_the_run_dtype(comm, shared_dir):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(64, 2, 3), dtype=np.uint8)
    y = rng.integers(CLASSES, size=64)
    path = write_on_root(comm, os.path.join(shared_dir, "u8.h5"), images, y)
    settings = config(path, dtype="float32", normalize="minmax", val_fraction=0.25)
    dataset = open_dataset(settings, [FEATURES, 5, CLASSES], comm)
    data = load_rank_data(dataset, settings, CLASSES, comm)
    assert data.val_x.dtype == np.float32
    flat = images.reshape(64, -1).astype(np.float32)
    shift, scale = expected_statistics("minmax", flat.astype(np.float64), settings)
    np.testing.assert_allclose(data.val_x, ((flat[data.val_rows] - shift) / scale).astype(np.float32), rtol=1e-6)
    dataset.close()
