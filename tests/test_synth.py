"""Synthetic sets: the linreg generator recovers its coefficients, the classification set is learnable
by a nonlinear rule but not by a linear one, and write_h5 round-trips one file or contiguous shards."""

import os

import h5py
import numpy as np
import pytest

from mpitrain.data.partition import uniform
from mpitrain.data.synth import make_classification, make_linreg, shard_name, write_h5
from mpitrain.errors import MpitrainError

TRUE_COEF = np.array([2.0, 3.0])


def test_linreg_least_squares_recovers_the_coefficients():
    # Each coefficient's standard error here is about 0.06 (no intercept, x uniform), so 0.1 is a real
    # check of the generator's formula, on a fixed seed.
    x, y = make_linreg(2000, seed=0)
    coef, *_ = np.linalg.lstsq(x.astype(np.float64), y.astype(np.float64), rcond=None)
    assert np.all(np.abs(coef - TRUE_COEF) < 0.1), coef


def test_linreg_inputs_are_unit_square_and_noise_is_standard_normal():
    n = 2000
    x, y = make_linreg(n, seed=1, dtype=np.float64)
    assert x.shape == (n, 2) and y.shape == (n,) and x.dtype == y.dtype == np.float64
    assert x.min() >= 0.0 and x.max() < 1.0
    noise = y - x @ TRUE_COEF
    # 4 standard errors of the sample mean (1/sqrt(n)) and of the sample std (1/sqrt(2n)).
    assert abs(noise.mean()) < 4 / np.sqrt(n)
    assert abs(noise.std() - 1.0) < 4 / np.sqrt(2 * n)


def test_classification_shapes_dtypes_and_labels():
    x, y = make_classification(500, 30, 4, seed=0)
    assert x.shape == (500, 30) and x.dtype == np.float32
    assert y.shape == (500,) and y.dtype == np.int64
    np.testing.assert_array_equal(np.unique(y), np.arange(4))
    x64, y64 = make_classification(500, 30, 4, seed=0, dtype=np.float64)
    assert x64.dtype == np.float64
    np.testing.assert_array_equal(x64.astype(np.float32), x)
    np.testing.assert_array_equal(y64, y)


def test_classification_is_seeded():
    a, b = make_classification(50, 8, 3, seed=0), make_classification(50, 8, 3, seed=0)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], make_classification(50, 8, 3, seed=1)[0])


def nearest(queries, references):
    """Index of the nearest reference (squared Euclidean) for every query row."""
    d = (queries ** 2).sum(1)[:, None] - 2.0 * queries @ references.T + (references ** 2).sum(1)[None]
    return d.argmin(1)


def test_classification_is_learnable_but_not_linearly():
    classes = 10
    x, y = make_classification(1500, 784, classes, seed=0)
    x_train, y_train, x_val, y_val = x[:1200], y[:1200], x[1200:], y[1200:]
    one_nn = np.mean(y_train[nearest(x_val, x_train)] == y_val)
    class_means = np.stack([x_train[y_train == c].mean(0) for c in range(classes)])
    nearest_mean = np.mean(nearest(x_val, class_means) == y_val)
    # A local rule (1-NN) separates the classes; a linear one (nearest class mean) cannot, since each
    # class is several clusters: the MLP must learn a nonlinear boundary.
    assert one_nn >= 0.95
    assert nearest_mean <= 0.8


def test_write_h5_single_file_round_trips(tmp_path):
    x, y = make_classification(20, 5, 3, seed=0)
    path = str(tmp_path / "sub" / "data.h5")
    write_h5(path, x, y)
    write_h5(path, x[:10], y[:10])  # replaces the file in one rename
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["x"][...], x[:10])
        np.testing.assert_array_equal(f["y"][...], y[:10])
    assert os.listdir(tmp_path / "sub") == ["data.h5"], "temporary files left behind"


def test_write_h5_shards_are_contiguous_blocks_in_name_order(tmp_path):
    x, y = make_classification(23, 5, 3, seed=0)
    path = str(tmp_path / "shards")
    write_h5(path, x, y, shards=5)
    write_h5(path, x, y, shards=3)  # stale part-00003/4 from the wider write must go
    assert sorted(os.listdir(path)) == [shard_name(i) for i in range(3)]
    for index in range(3):
        start, stop = uniform(len(x), index, 3)
        with h5py.File(os.path.join(path, shard_name(index)), "r") as f:
            np.testing.assert_array_equal(f["x"][...], x[start:stop])
            np.testing.assert_array_equal(f["y"][...], y[start:stop])


def test_write_h5_rejects_more_shards_than_rows(tmp_path):
    with pytest.raises(MpitrainError, match="cannot split 3 rows into 4 shards"):
        write_h5(str(tmp_path / "d"), np.zeros((3, 2)), np.zeros(3), shards=4)
