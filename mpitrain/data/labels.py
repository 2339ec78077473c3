"""Labels as users store them, turned into what a loss takes, or refused with one line.

    --loss ce (C classes)   y (N,) or (N, 1), integer, or float holding whole numbers -> class index (N,) int64
                            y (N, C) one-hot (exactly one 1 per row, zeros elsewhere) -> class index (N,) int64
    --loss mse (K outputs)  y (N, K), or (N,) when K = 1                              -> targets as stored, float

The shape is checked once at start-up (`label_format`), the values as rows are read (`to_model`),
so a (N, 1) label array can never reach the loss as (B, 1) and broadcast into a wrong loss.
"""

from dataclasses import dataclass

import numpy as np

from mpitrain.errors import MpitrainError


class BadLabel(MpitrainError):
    """A label value the loss cannot take; `position` is its row within the array converted."""

    def __init__(self, position: int, message: str):
        super().__init__(message)
        self.position = position


@dataclass(frozen=True)
class LabelFormat:
    """How stored labels become model labels: kind is 'index' ((N,) or (N, 1) class ids),
    'onehot' ((N, C)) or 'target' (regression, as stored)."""

    kind: str
    loss: str
    outputs: int
    row_shape: tuple
    dtype: np.dtype


def _shape(row_shape: tuple) -> str:
    return "(N" + "".join(f", {d}" for d in row_shape) + ("" if row_shape else ",") + ")"


def label_format(row_shape: tuple, dtype, loss: str, outputs: int) -> LabelFormat:
    """The conversion for labels of per-row shape `row_shape` under `loss` with `outputs` model outputs.

    Raises MpitrainError giving the shape found and the shapes expected.
    """
    row_shape, dtype = tuple(row_shape), np.dtype(dtype)
    if loss == "ce":
        if row_shape in ((), (1,)):
            return LabelFormat("index", loss, outputs, row_shape, dtype)
        if row_shape == (outputs,) and outputs > 1:
            return LabelFormat("onehot", loss, outputs, row_shape, dtype)
        raise MpitrainError(f"'y' has shape {_shape(row_shape)}; --loss ce with {outputs} classes expects class "
                            f"indices (N,) or (N, 1), or one-hot rows (N, {outputs})")
    if row_shape == (outputs,) or (row_shape == () and outputs == 1):
        return LabelFormat("target", loss, outputs, row_shape, dtype)
    expected = "(N,) or (N, 1)" if outputs == 1 else f"(N, {outputs})"
    raise MpitrainError(f"'y' has shape {_shape(row_shape)}; --loss mse with {outputs} outputs expects {expected}")


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _class_index(y: np.ndarray, fmt: LabelFormat) -> np.ndarray:
    y = y.reshape(len(y))
    if y.dtype.kind == "f":
        whole = np.isfinite(y) & (y == np.round(y))
        if not whole.all():
            i = _first(~whole)
            raise BadLabel(i, f"label {y[i]!r} is not a whole number; --loss ce needs class indices")
    labels = y.astype(np.int64)
    bad = (labels < 0) | (labels >= fmt.outputs)
    if bad.any():
        i = _first(bad)
        raise BadLabel(i, f"label {labels[i]} is outside [0, {fmt.outputs}) for a model with {fmt.outputs} outputs")
    return labels


def _from_onehot(y: np.ndarray, fmt: LabelFormat) -> np.ndarray:
    is_binary = (y == 0) | (y == 1)
    one_per_row = is_binary.all(axis=1) & ((y == 1).sum(axis=1) == 1)
    if not one_per_row.all():
        i = _first(~one_per_row)
        raise BadLabel(i, f"row of 'y' is {np.array2string(y[i], threshold=8)}, not one-hot (one 1, the rest 0): "
                          f"for --loss ce store class indices (y.argmax(axis=1)), or train on these "
                          f"targets with --loss mse")
    return np.argmax(y, axis=1).astype(np.int64)


def to_model(y: np.ndarray, fmt: LabelFormat) -> np.ndarray:
    """Stored labels (B, *row_shape) -> class indices (B,) int64 for ce, or targets for mse.

    Raises BadLabel (an MpitrainError) naming the first bad value and its position in y.
    """
    if fmt.kind == "index":
        return _class_index(y, fmt)
    if fmt.kind == "onehot":
        return _from_onehot(y, fmt)
    if y.dtype.kind != "f":
        y = y.astype(np.float64)
    finite = np.isfinite(y).reshape(len(y), -1).all(axis=1)
    if not finite.all():
        raise BadLabel(_first(~finite), "'y' holds NaN or Inf")
    return y

