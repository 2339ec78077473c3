"""eval and predict on a saved model: metrics over all ranks equal a serial computation, predictions
equal a serial forward pass row for row, and --normalize statistics from the file are applied."""

import dataclasses
import json
import os

import h5py
import numpy as np
import pytest

from harness import mpitrain_argv, run_on_root, write_on_root
from mpitrain import evaluate
from mpitrain.config import TrainConfig, validate
from mpitrain.data import synth
from mpitrain.data.tools import refuse_overwrite
from mpitrain.errors import MpitrainError
from mpitrain.train import train

ROWS, FEATURES, CLASSES = 157, 10, 4
TOL = 1e-12


def config(path, **overrides) -> TrainConfig:
    base = dict(data=path, model=f"{FEATURES}-9-{CLASSES}", batch_size=16, dtype="float64", device="cpu",
                progress=False, val_fraction=0.1, seed=3, lr=0.01, steps=12)
    return validate(dataclasses.replace(TrainConfig(), **{**base, **overrides}))


def serial_forward(path, x):
    """The saved model's outputs computed here from the file alone: normalize, then dense layers."""
    with h5py.File(path, "r") as f:
        widths = [int(w) for w in f.attrs["model"].split("-")]
        if f.attrs.get("normalize", "none") != "none":
            x = (x - f["normalize/shift"][()]) / f["normalize/scale"][()]
        for i in range(len(widths) - 1):
            x = x @ f[f"{i}/weight"][()] + f[f"{i}/bias"][()]
            if i < len(widths) - 2:
                x = np.maximum(x, 0.0)
    return x


@pytest.fixture
def classifier(comm, shared_dir):
    """(model file, test file, x, y): a model trained with --normalize standard, and held-out rows."""
    x, y = synth.make_classification(2 * ROWS, FEATURES, CLASSES, seed=8, dtype=np.float64)
    x = x * 5.0 + 3.0
    train_path = write_on_root(comm, os.path.join(shared_dir, "train.h5"), x[:ROWS], y[:ROWS])
    test_path = write_on_root(comm, os.path.join(shared_dir, "test.h5"), x[ROWS:], y[ROWS:])
    model = os.path.join(shared_dir, "model.h5")
    train(config(train_path, normalize="standard", save=model), comm)
    return model, test_path, x[ROWS:], y[ROWS:]


@pytest.mark.parametrize("batch_rows", [7, 4096])
def test_classification_metrics_equal_a_serial_computation(comm, classifier, batch_rows):
    model_path, test_path, x, y = classifier
    model = evaluate.open_model(model_path, np, comm)
    dataset = evaluate.open_data(test_path, model, "x", "y", comm)
    got = evaluate.evaluate(model, dataset, np, comm, batch_rows)
    dataset.close()

    logits = serial_forward(model_path, x)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    predicted = logits.argmax(axis=1)
    confusion = np.zeros((CLASSES, CLASSES), dtype=np.int64)
    np.add.at(confusion, (y, predicted), 1)
    assert got["confusion"] == confusion.tolist()
    assert got["loss"] == pytest.approx(-log_probs[np.arange(len(y)), y].mean(), rel=TOL)
    assert got["accuracy"] == pytest.approx(np.mean(predicted == y), rel=TOL)
    for c in range(CLASSES):
        tp = np.sum((predicted == c) & (y == c))
        precision = tp / max(np.sum(predicted == c), 1)
        recall = tp / max(np.sum(y == c), 1)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert (got["precision"][c], got["recall"][c], got["f1"][c]) == pytest.approx((precision, recall, f1), rel=TOL)


def test_regression_metrics_equal_a_serial_computation(comm, shared_dir):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((ROWS, FEATURES))
    y = x[:, :2] @ rng.standard_normal((2, 2)) + 0.1 * rng.standard_normal((ROWS, 2))
    path = write_on_root(comm, os.path.join(shared_dir, "reg.h5"), x, y)
    model_path = os.path.join(shared_dir, "reg-model.h5")
    train(config(path, model=f"{FEATURES}-2", loss="mse", normalize="minmax", save=model_path), comm)
    model = evaluate.open_model(model_path, np, comm)
    dataset = evaluate.open_data(path, model, "x", "y", comm)
    got = evaluate.evaluate(model, dataset, np, comm, 11)
    dataset.close()
    diff = serial_forward(model_path, x) - y
    r2 = 1 - (diff ** 2).sum(axis=0) / ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    assert got["mse"] == pytest.approx(np.mean(diff ** 2), rel=TOL)
    assert got["mae"] == pytest.approx(np.mean(np.abs(diff)), rel=TOL)
    assert got["r2_per_output"] == pytest.approx(r2.tolist(), rel=1e-10)


@pytest.mark.parametrize("batch_rows", [5, 4096])
def test_predictions_equal_a_serial_forward_pass_row_for_row(comm, classifier, shared_dir, batch_rows):
    model_path, test_path, x, _ = classifier
    out = os.path.join(shared_dir, f"pred-{batch_rows}.h5")
    model = evaluate.open_model(model_path, np, comm)
    dataset = evaluate.open_data(test_path, model, "x", None, comm)
    evaluate.predict(model, dataset, out, np, comm, batch_rows)
    dataset.close()
    logits = serial_forward(model_path, x)
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["class"][()], logits.argmax(axis=1))
        np.testing.assert_allclose(f["probabilities"][()], probabilities, rtol=1e-12, atol=1e-15)
    with pytest.raises(MpitrainError, match="already exists; pass --force"):
        refuse_overwrite(out, force=False)


def test_a_model_file_without_a_model_is_refused(comm, shared_dir):
    path = os.path.join(shared_dir, "not-a-model.h5")
    if comm.rank == 0:
        with h5py.File(path, "w") as f:
            f["x"] = np.zeros((3, 2))
    comm.Barrier()
    with pytest.raises(MpitrainError, match="not-a-model.h5: no 'model' attribute"):
        evaluate.open_model(path, np, comm)


def test_eval_and_predict_commands(comm, classifier, shared_dir):
    """The CLI on 2 ranks: metrics JSON equal to the library's, predictions written, overwrite refused."""
    model_path, test_path, x, _ = classifier
    metrics = os.path.join(shared_dir, "metrics.json")
    done = run_on_root(comm, mpitrain_argv(2, "eval", "--model-file", model_path, "--data", test_path,
                                           "--metrics", metrics, "--device", "cpu"))
    assert done["returncode"] == 0, done["stderr"]
    assert "confusion matrix" in done["stdout"]
    model = evaluate.open_model(model_path, np, comm)
    dataset = evaluate.open_data(test_path, model, "x", "y", comm)
    expected = evaluate.evaluate(model, dataset, np, comm)
    dataset.close()
    with open(metrics) as handle:
        written = json.load(handle)
    assert written["confusion"] == expected["confusion"]
    assert written["loss"] == pytest.approx(expected["loss"], rel=TOL)
    out = os.path.join(shared_dir, "cli-pred.h5")
    argv = ["predict", "--model-file", model_path, "--data", test_path, "--out", out, "--device", "cpu"]
    assert run_on_root(comm, mpitrain_argv(2, *argv))["returncode"] == 0
    again = run_on_root(comm, mpitrain_argv(2, *argv))
    assert again["returncode"] == 2
    assert again["stderr"].strip() == f"mpitrain: error: --out {out}: already exists; pass --force to overwrite it"
    assert run_on_root(comm, mpitrain_argv(2, *argv, "--force"))["returncode"] == 0
