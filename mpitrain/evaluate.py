"""Use a saved model: `mpitrain eval` scores it on a labelled file, `mpitrain predict` writes its outputs.

    mpirun -n 4 mpitrain eval --model-file model.h5 --data test.h5 --metrics test.json
    mpirun -n 4 mpitrain predict --model-file model.h5 --data new.h5 --out predictions.h5

    from mpitrain import evaluate
    metrics = evaluate("model.h5", "test.h5")        # the module is callable: evaluate_file below

A model file (`train --save`) carries its widths, activation, loss, dtype and any --normalize
statistics, so neither command needs --model. Each rank reads only its contiguous block of rows
(partition.uniform), a block of --batch-rows at a time; eval sums counts over the ranks, predict
has the ranks write their blocks into one file in turn, so no rank ever holds more than one block.
"""

import json
import sys
import types
from dataclasses import dataclass
from typing import Callable

import h5py
import numpy as np
from mpi4py import MPI

from mpitrain.backend import read_scalar, select_backend, to_host
from mpitrain.comm import agree, world
from mpitrain.data import normalize
from mpitrain.data.hdf5 import H5Dataset
from mpitrain.data.labels import label_format
from mpitrain.data.partition import uniform
from mpitrain.errors import MpitrainError, error_of
from mpitrain.h5 import open_read
from mpitrain.nn.losses import MeanSquaredError, SoftmaxCrossEntropy
from mpitrain.nn.model import Model, parse_widths
from mpitrain.outputs import create_temporary, discard, publish, write_error

BATCH_ROWS = 4096


# ---------------------------------------------------------------------------- the model file


@dataclass
class ModelFile:
    """A saved model, ready to run: forward maps (B, widths[0]) normalized inputs to (B, widths[-1])."""

    forward: Callable
    widths: list[int]
    activation: str
    loss: str
    dtype: np.dtype
    normalization: normalize.Normalization | None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def load_model_file(path: str, xp=np, dtype=None) -> ModelFile:
    """The model saved at `path` (a `train --save` file) on array module xp, in `dtype` (default: the
    dtype it was trained in). Raises MpitrainError for a missing, unreadable or incomplete file. Local."""
    try:
        with open_read(path, "--model-file ") as handle:
            attrs = {key: _text(handle.attrs[key]) for key in ("model", "activation", "config") if key in handle.attrs}
            if "model" not in attrs:
                raise MpitrainError(f"{path}: no 'model' attribute; expected a file written by mpitrain train --save")
            config = json.loads(attrs.get("config", "{}"))
            widths = parse_widths(attrs["model"])
            model = Model(widths, attrs.get("activation", "relu"), xp=xp,
                          dtype=np.dtype(dtype or config.get("dtype", "float32")))
            named = dict(model.named_parameters())
            missing = [name for name in named if not isinstance(handle.get(name), h5py.Dataset)]
            if missing:
                raise MpitrainError(f"{path}: no dataset '{missing[0]}' for model {attrs['model']}")
            model.load_state({name: handle[name][()] for name in named})
            norm = normalize.from_file(handle, path, widths[0])
    except FileNotFoundError:
        raise MpitrainError(f"--model-file {path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise MpitrainError(f"--model-file {path}: not a readable model file ({str(exc).splitlines()[0]})") from None
    # micro=None: inference keeps nothing for a backward pass.
    return ModelFile(lambda x: model.forward(x, None), widths, attrs.get("activation", "relu"),
                     config.get("loss", "ce"), model.dtype, norm)


def open_model(path: str, xp, comm: MPI.Intracomm) -> ModelFile:
    """load_model_file on every rank; every rank raises alike if any failed. Collective on comm."""
    model, error = None, None
    try:
        model = load_model_file(path, xp)
    except MpitrainError as exc:
        error = exc
    agree(comm, error)
    return model


def open_data(path: str, model: ModelFile, x_key: str, y_key: str | None, comm: MPI.Intracomm) -> H5Dataset:
    """The data file checked against the model: features, labels for its loss, its normalization. Collective."""
    dataset, error = None, None
    try:
        dataset = H5Dataset(path, x_key, y_key)
        if dataset.n_features != model.widths[0]:
            raise MpitrainError(f"{path}: '{x_key}' has {dataset.n_features} features but the model expects "
                                f"{model.widths[0]}")
        if y_key is not None:
            try:
                dataset.labels = label_format(dataset.y_row_shape, dataset.y_dtype, model.loss, model.widths[-1])
            except MpitrainError as exc:
                raise MpitrainError(f"{path}: {exc}") from None
        dataset.x_out_dtype = model.dtype
        dataset.normalizer = model.normalization
    except MpitrainError as exc:
        error = exc
    agree(comm, error)
    return dataset


def own_blocks(n_rows: int, comm: MPI.Intracomm, batch_rows: int):
    """Consecutive row arrays of at most batch_rows covering this rank's uniform block, in order."""
    start, stop = uniform(n_rows, comm.rank, comm.size)
    for a in range(start, stop, batch_rows):
        yield np.arange(a, min(a + batch_rows, stop))


# ---------------------------------------------------------------------------- eval


def classification_metrics(loss_sum: float, confusion: np.ndarray) -> dict:
    """loss, accuracy, per-class precision/recall/F1 (0 where undefined) from the summed loss and
    the confusion matrix (true class rows, predicted class columns)."""
    n = int(confusion.sum())
    hits = np.diag(confusion).astype(np.float64)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, actual, out=np.zeros_like(hits), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    return {"rows": n, "loss": loss_sum / n, "accuracy": hits.sum() / n, "precision": precision.tolist(),
            "recall": recall.tolist(), "f1": f1.tolist(), "macro_f1": float(f1.mean()),
            "support": actual.tolist(), "confusion": confusion.tolist()}


def regression_metrics(sse: np.ndarray, sae: np.ndarray, target_moments) -> dict:
    """mse (the training loss: mean over rows and outputs), mae, and R^2 = 1 - SSE/SST per output and averaged."""
    n, _, m2 = target_moments
    outputs = len(sse)
    r2 = 1.0 - np.divide(sse, m2, out=np.full(outputs, np.nan), where=m2 > 0)
    return {"rows": int(n), "mse": float(sse.sum() / (n * outputs)), "mae": float(sae.sum() / (n * outputs)),
            "r2": float(np.mean(r2)), "r2_per_output": r2.tolist()}


def evaluate(model: ModelFile, dataset: H5Dataset, xp, comm: MPI.Intracomm, batch_rows: int = BATCH_ROWS) -> dict:
    """Metrics of `model` over every row of `dataset`, each rank reading only its block. Collective;
    every rank returns the same dict."""
    classes = model.widths[-1]
    confusion = np.zeros((classes, classes), dtype=np.int64)
    sums = np.zeros(1 + 2 * classes)  # loss or (sse, sae) per output
    moments, error = normalize.moments(np.zeros((0, classes))), None
    loss = SoftmaxCrossEntropy(xp) if model.loss == "ce" else MeanSquaredError(xp)
    try:
        for rows in own_blocks(dataset.n_rows, comm, batch_rows):
            x, y = dataset.read(rows)
            out = model.forward(xp.asarray(x))
            if model.loss == "ce":
                sums[0] += read_scalar(loss.forward(out, xp.asarray(y)))
                predicted = to_host(xp.argmax(out, axis=1))
                confusion += np.bincount(y * classes + predicted, minlength=classes * classes).reshape(classes, -1)
            else:
                diff = to_host(out).astype(np.float64) - y.reshape(len(y), -1)
                sums[1:1 + classes] += (diff ** 2).sum(axis=0)
                sums[1 + classes:] += np.abs(diff).sum(axis=0)
                moments = normalize.merge_moments(moments, normalize.moments(y.reshape(len(y), -1)))
    except MpitrainError as exc:
        error = exc
    agree(comm, error)
    comm.Allreduce(MPI.IN_PLACE, confusion, op=MPI.SUM)
    comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
    if model.loss == "ce":
        return classification_metrics(float(sums[0]), confusion)
    # The targets' spread (for R^2) is merged like --normalize statistics: exact to rounding at any world size.
    parts = comm.allgather(moments)
    total = parts[0]
    for part in parts[1:]:
        total = normalize.merge_moments(total, part)
    return regression_metrics(sums[1:1 + classes], sums[1 + classes:], total)


def evaluate_file(model_file: str, data: str, x_key: str = "x", y_key: str = "y", comm: MPI.Intracomm | None = None,
                  batch_rows: int = BATCH_ROWS, device: str = "auto") -> dict:
    """`mpitrain eval` from Python: the metrics of the saved model `model_file` (a train --save or
    --save-best file) over every row of `data`, each rank of comm (default: the whole job) reading
    its block. Collective; every rank returns the same dict (see classification_metrics and
    regression_metrics); MpitrainError on every rank for a bad file."""
    comm = world() if comm is None else comm
    if batch_rows < 1:
        raise MpitrainError(f"--batch-rows {batch_rows}: must be at least 1")
    xp = select_backend(device, comm).xp
    model = open_model(model_file, xp, comm)
    dataset = open_data(data, model, x_key, y_key, comm)
    try:
        return evaluate(model, dataset, xp, comm, batch_rows)
    finally:
        dataset.close()


def describe_metrics(metrics: dict) -> list[str]:
    """The lines `mpitrain eval` prints: totals, then per class and the confusion matrix."""
    if "accuracy" not in metrics:
        return [f"rows {metrics['rows']}: mse {metrics['mse']:.6g}, mae {metrics['mae']:.6g}, r2 {metrics['r2']:.6f}"]
    lines = [f"rows {metrics['rows']}: loss {metrics['loss']:.6f}, accuracy {metrics['accuracy']:.4f}, "
             f"macro F1 {metrics['macro_f1']:.4f}", "class  precision  recall  f1      support"]
    for c, (p, r, f, n) in enumerate(zip(metrics["precision"], metrics["recall"], metrics["f1"], metrics["support"])):
        lines.append(f"{c:<6} {p:<10.4f} {r:<7.4f} {f:<7.4f} {n}")
    lines.append("confusion matrix (rows: true class, columns: predicted)")
    width = max(len(str(v)) for row in metrics["confusion"] for v in row)
    lines += [" ".join(f"{v:>{width}}" for v in row) for row in metrics["confusion"]]
    return lines


# ---------------------------------------------------------------------------- predict


def _create_output(f: h5py.File, model: ModelFile, n_rows: int, batch_rows: int, source: str) -> None:
    chunk = (min(batch_rows, n_rows),)
    if model.loss == "ce":
        f.create_dataset("class", shape=(n_rows,), dtype=np.int64, chunks=chunk)
        f.create_dataset("probabilities", shape=(n_rows, model.widths[-1]), dtype=model.dtype,
                         chunks=chunk + (model.widths[-1],))
    else:
        f.create_dataset("outputs", shape=(n_rows, model.widths[-1]), dtype=model.dtype,
                         chunks=chunk + (model.widths[-1],))
    f.attrs["source"] = source


def _write_own_rows(path: str, model: ModelFile, dataset: H5Dataset, xp, comm, batch_rows: int) -> None:
    with h5py.File(path, "r+") as f:
        for rows in own_blocks(dataset.n_rows, comm, batch_rows):
            out = model.forward(xp.asarray(dataset.read_x(rows)))
            at = slice(int(rows[0]), int(rows[-1]) + 1)
            if model.loss == "ce":
                shifted = out - xp.max(out, axis=1, keepdims=True)
                probabilities = xp.exp(shifted)
                probabilities /= xp.sum(probabilities, axis=1, keepdims=True)
                f["class"][at] = to_host(xp.argmax(out, axis=1))
                f["probabilities"][at] = to_host(probabilities)
            else:
                f["outputs"][at] = to_host(out)


def predict(model: ModelFile, dataset: H5Dataset, out: str, xp, comm: MPI.Intracomm,
            batch_rows: int = BATCH_ROWS) -> None:
    """Write the model's outputs for every row of `dataset`, in row order, to the HDF5 file `out`:
    `class` (N,) and `probabilities` (N, C) for ce, `outputs` (N, K) for mse. Rank 0 creates the file
    under a temporary name; the ranks then write their blocks one after the other (one open file
    at a time, one block in memory), and rank 0 renames it into place. Collective on comm."""
    temporary, error = None, None
    if comm.rank == 0:
        try:
            temporary = create_temporary(out, lambda f: _create_output(f, model, dataset.n_rows, batch_rows,
                                                                         dataset.path))
        except MpitrainError as exc:
            error = MpitrainError(f"--out {exc}")
    temporary = comm.bcast(temporary, root=0)
    agree(comm, error)
    for turn in range(comm.size):
        if turn == comm.rank and error is None:
            try:
                _write_own_rows(temporary, model, dataset, xp, comm, batch_rows)
            except MpitrainError as exc:
                error = MpitrainError(f"--out {out}: {exc}")
            except OSError as exc:
                error = write_error(out, exc)
        # HDF5 files are not opened by two writers at once: the next rank waits for this one to close.
        comm.Barrier()
    try:
        agree(comm, error)
    except MpitrainError:
        if comm.rank == 0:
            discard(temporary)
        raise
    agree(comm, error_of(publish, temporary, out) if comm.rank == 0 else None)


class _CallableModule(types.ModuleType):
    """`from mpitrain import evaluate` finds this module (see train.py's note), so calling it
    calls evaluate_file()."""

    def __call__(self, *args, **kwargs) -> dict:
        return evaluate_file(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
