"""Every label shape users store trains on the right loss, or stops with one line at start-up.

The parameters of a run on labels stored as (N, 1), float, or one-hot equal those of the same run
on the canonical (N,) int64 labels, in every layout (data parallel, --tp 2, --pp 2, --sync ps) and partition;
a shape or value the loss cannot take raises one MpitrainError on every rank of the run.
"""

import dataclasses
import os

import numpy as np
import pytest

from groups import groups_of
from harness import mpitrain_argv, run_on_root, write_on_root
from mpitrain.config import TrainConfig, validate
from mpitrain.data import synth
from mpitrain.data.labels import BadLabel, label_format, to_model
from mpitrain.errors import MpitrainError
from mpitrain.train import train

ROWS, FEATURES, CLASSES = 240, 12, 3


def config(path, **overrides) -> TrainConfig:
    base = dict(data=path, model=f"{FEATURES}-8-{CLASSES}", batch_size=12, dtype="float64", device="cpu",
                progress=False, val_fraction=0.1, seed=2, lr=0.01, steps=4)
    return validate(dataclasses.replace(TrainConfig(), **{**base, **overrides}))


def stored_labels(y: np.ndarray, kind: str) -> np.ndarray:
    """y (N,) int64 as users store it."""
    return {"index": y, "column": y[:, None], "float": y.astype(np.float64), "float_column": y[:, None] * 1.0,
            "onehot": np.eye(CLASSES, dtype=np.uint8)[y], "onehot_float": np.eye(CLASSES)[y]}[kind]


def bad_labels(y: np.ndarray, kind: str) -> tuple[np.ndarray, str]:
    """(labels, the message pattern) for labels the loss cannot take."""
    if kind == "fractional":
        return y + 0.5, "is not a whole number"
    if kind == "soft":
        return np.full((len(y), CLASSES), 1.0 / CLASSES), "not one-hot.*argmax.*--loss mse"
    if kind == "wide":
        return np.zeros((len(y), CLASSES + 1), dtype=np.int64), r"has shape \(N, 4\).*expects class indices"
    if kind == "cube":
        return y[:, None, None], r"has shape \(N, 1, 1\)"
    return y + CLASSES, r"label \d+ is outside \[0, 3\)"


@pytest.fixture
def dataset_files(comm, shared_dir):
    """{kind: path} of the same rows under every stored label format."""
    x, y = synth.make_classification(ROWS, FEATURES, CLASSES, seed=4)
    kinds = ["index", "column", "float", "float_column", "onehot", "onehot_float"]
    paths = {kind: write_on_root(comm, os.path.join(shared_dir, f"{kind}.h5"), x, stored_labels(y, kind))
             for kind in kinds}
    for kind in ["fractional", "soft", "wide", "cube", "range"]:
        labels, pattern = bad_labels(y, kind)
        paths[kind] = (write_on_root(comm, os.path.join(shared_dir, f"{kind}.h5"), x, labels), pattern)
    return paths


LAYOUTS = {"dp": dict(), "tp": dict(tp=2), "pp": dict(pp=2), "ps": dict(sync="ps", ps_mode="sync")}


def run_layout(comm, layout, path, **overrides):
    """Train under `layout` on 2 ranks of comm (the data-parallel one on all of comm); None off the group."""
    if layout == "dp":
        return train(config(path, **overrides), comm)
    with groups_of(comm, 2) as group:
        return None if group is None else train(config(path, **LAYOUTS[layout], **overrides), group)


@pytest.mark.parametrize("partition,sampler", [("uniform", "shard"), ("stratified", "shard"), ("uniform", "global")])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_stored_label_formats_train_like_class_indices(comm, dataset_files, layout, partition, sampler):
    expected = run_layout(comm, layout, dataset_files["index"], partition=partition, sampler=sampler)
    for kind in ["column", "float", "float_column", "onehot", "onehot_float"]:
        got = run_layout(comm, layout, dataset_files[kind], partition=partition, sampler=sampler)
        if got is None:
            continue
        for name, value in expected.parameters.items():
            np.testing.assert_array_equal(got.parameters[name], value, err_msg=f"{kind}: {name}")
        assert got.history[-1]["val_loss"] == expected.history[-1]["val_loss"]


@pytest.mark.parametrize("partition", ["uniform", "stratified"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["fractional", "soft", "wide", "cube", "range"])
def test_labels_the_loss_cannot_take_stop_every_rank(comm, dataset_files, layout, partition, kind):
    path, pattern = dataset_files[kind]
    if layout == "dp":
        with pytest.raises(MpitrainError, match=pattern) as raised:
            train(config(path, partition=partition), comm)
        assert "\n" not in str(raised.value)
        return
    with groups_of(comm, 2) as group:
        if group is not None:
            with pytest.raises(MpitrainError, match=pattern):
                train(config(path, partition=partition, **LAYOUTS[layout]), group)


def test_regression_targets_of_every_width(comm, shared_dir):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ROWS, FEATURES))
    y2 = x[:, :2] @ np.array([[1.0, -1.0], [0.5, 2.0]])
    two = write_on_root(comm, os.path.join(shared_dir, "two.h5"), x, y2)
    one = write_on_root(comm, os.path.join(shared_dir, "one.h5"), x, y2[:, 0])
    one_column = write_on_root(comm, os.path.join(shared_dir, "one_column.h5"), x, y2[:, :1])
    train(config(two, model=f"{FEATURES}-2", loss="mse"), comm)
    flat = train(config(one, model=f"{FEATURES}-1", loss="mse"), comm)
    column = train(config(one_column, model=f"{FEATURES}-1", loss="mse"), comm)
    for name, value in flat.parameters.items():
        np.testing.assert_array_equal(column.parameters[name], value)
    with pytest.raises(MpitrainError, match=r"has shape \(N,\); --loss mse with 2 outputs expects \(N, 2\)"):
        train(config(one, model=f"{FEATURES}-2", loss="mse"), comm)
    with pytest.raises(MpitrainError, match=r"has shape \(N, 2\); --loss mse with 3 outputs"):
        train(config(two, model=f"{FEATURES}-3", loss="mse"), comm)


def test_stratified_needs_class_labels():
    with pytest.raises(MpitrainError, match="stratified.*--loss ce"):
        config("unused.h5", loss="mse", partition="stratified")


# ---------------------------------------------------------------- the conversion itself, one process


@pytest.mark.parametrize("kind", ["index", "column", "float", "float_column", "onehot", "onehot_float"])
def test_conversion_gives_class_indices(kind):
    y = np.random.default_rng(1).integers(CLASSES, size=50)
    stored = stored_labels(y, kind)
    fmt = label_format(stored.shape[1:], stored.dtype, "ce", CLASSES)
    got = to_model(stored, fmt)
    assert got.dtype == np.int64 and got.shape == y.shape
    np.testing.assert_array_equal(got, y)


def test_bad_values_name_their_position():
    y = np.array([0.0, 1.0, 2.5, 1.0])
    with pytest.raises(BadLabel) as raised:
        to_model(y, label_format((), y.dtype, "ce", CLASSES))
    assert raised.value.position == 2 and "2.5" in str(raised.value)


def test_a_bad_label_file_is_one_line_and_exit_2_from_the_command_line(comm, dataset_files, shared_dir):
    path, _ = dataset_files["fractional"]
    toml = os.path.join(shared_dir, "keys.toml")
    if comm.rank == 0:
        with open(toml, "w") as handle:
            handle.write('[train]\nx-key = "x"\ny-key = "y"\nnormalize = "standard"\n')
    comm.Barrier()
    done = run_on_root(comm, mpitrain_argv(2, "train", "--data", path, "--config", toml, "--model",
                                           f"{FEATURES}-8-{CLASSES}", "--partition", "stratified", "--steps", "1",
                                           "--batch-size", "8", "--no-progress", "--device", "cpu"))
    assert done["returncode"] == 2, done["stderr"]
    lines = done["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpitrain: error: ") and "is not a whole number" in lines[0]
