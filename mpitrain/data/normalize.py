"""Input normalization fitted on the training rows of every rank, saved with the model, applied again.

    standard: x' = (x - mean) / std      mean, std (population) of each feature over the training rows
    minmax:   x' = (x - min) / (max - min)

Each rank reduces its own rows to (count, mean, M2) per feature in float64 and the ranks combine the
parts in rank order with Chan et al.'s pairwise update, so the result equals a two-pass NumPy
computation over all rows to rounding, whatever the world size. A constant feature gets scale 1
(it becomes 0), never a division by zero.

In a model file the statistics are two extra datasets, `normalize/shift` (mean or min) and
`normalize/scale` (std or max - min), and an attribute `normalize` naming the kind; a loader that
reads only `0/weight`, ... ignores them.
"""

from dataclasses import dataclass

import h5py
import numpy as np
from mpi4py import MPI

from mpitrain.errors import MpitrainError

KINDS = ("none", "standard", "minmax")
BLOCK_ROWS = 8192  # bounds the float64 temporaries of a large shard


@dataclass
class Normalization:
    """x' = (x - shift) / scale per feature; shift, scale (features,) float64."""

    kind: str
    shift: np.ndarray
    scale: np.ndarray

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(B, features) -> normalized copy in x's float dtype, computed in float64."""
        out = np.empty(x.shape, dtype=x.dtype if x.dtype.kind == "f" else np.float64)
        for a in range(0, len(x), BLOCK_ROWS):
            out[a:a + BLOCK_ROWS] = (x[a:a + BLOCK_ROWS] - self.shift) / self.scale
        return out


# ---------------------------------------------------------------------------- partial statistics


def moments(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(n, mean, M2 = sum (x - mean)^2) per feature of x (n, features), in float64."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0:
        return 0, np.zeros(x.shape[1]), np.zeros(x.shape[1])
    mean = x.mean(axis=0)
    return len(x), mean, ((x - mean) ** 2).sum(axis=0)


def merge_moments(a, b):
    """Chan et al.: the (n, mean, M2) of two disjoint sets from each set's."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    if n_a == 0 or n_b == 0:
        return b if n_a == 0 else a
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


def extremes(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(n, min, max) per feature, float64 (+inf, -inf without rows)."""
    if len(x) == 0:
        return 0, np.full(x.shape[1], np.inf), np.full(x.shape[1], -np.inf)
    return len(x), np.min(x, axis=0).astype(np.float64), np.max(x, axis=0).astype(np.float64)


def merge_extremes(a, b):
    return a[0] + b[0], np.minimum(a[1], b[1]), np.maximum(a[2], b[2])


def _reduce(kind, blocks):
    part, merge = (moments, merge_moments) if kind == "standard" else (extremes, merge_extremes)
    total = None
    for x in blocks:
        total = part(x) if total is None else merge(total, part(x))
    return total


# ---------------------------------------------------------------------------- fitting


def fit(kind: str, blocks, features: int, comm: MPI.Intracomm) -> Normalization | None:
    """Statistics of `kind` over the rows of every rank's blocks ((rows, features) arrays, this rank's
    training rows only); None for 'none'. Collective on comm: every rank gets the same statistics."""
    if kind == "none":
        return None
    if kind not in KINDS:
        raise MpitrainError(f"--normalize {kind!r}: expected one of {', '.join(KINDS)}")
    empty = np.zeros((0, features))
    mine = _reduce(kind, [empty, *blocks])
    parts = comm.allgather(mine)
    merge = merge_moments if kind == "standard" else merge_extremes
    total = parts[0]
    for part in parts[1:]:
        total = merge(total, part)
    if kind == "standard":
        n, shift, m2 = total
        spread = np.sqrt(m2 / max(n, 1))
    else:
        n, shift, high = total
        spread = high - shift
    scale = np.where(spread > 0, spread, 1.0)
    return Normalization(kind, shift, scale)


def row_blocks(read, rows: np.ndarray):
    """Yield read(rows block) for consecutive blocks of BLOCK_ROWS rows."""
    for a in range(0, len(rows), BLOCK_ROWS):
        yield read(rows[a:a + BLOCK_ROWS])


# ---------------------------------------------------------------------------- in a model file


def file_entries(norm: Normalization | None) -> tuple[dict, dict]:
    """({dataset name: array}, {attr: value}) that record `norm` in a model file; empty for none."""
    if norm is None:
        return {}, {}
    return {"normalize/shift": norm.shift, "normalize/scale": norm.scale}, {"normalize": norm.kind}


def from_file(handle: h5py.File, path: str, features: int) -> Normalization | None:
    """The normalization recorded in an open model file, or None (files without one are plain models)."""
    kind = handle.attrs.get("normalize", "none")
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    if kind == "none":
        return None
    if kind not in KINDS:
        raise MpitrainError(f"{path}: attribute normalize = {kind!r}: expected one of {', '.join(KINDS)}")
    arrays = []
    for name in ("normalize/shift", "normalize/scale"):
        node = handle.get(name)
        if not isinstance(node, h5py.Dataset) or node.shape != (features,):
            raise MpitrainError(f"{path}: normalize = {kind} needs dataset '{name}' of shape ({features},)")
        arrays.append(np.asarray(node[()], dtype=np.float64))
    return Normalization(kind, *arrays)


def attach(config, norm: Normalization | None) -> None:
    """Record the fitted statistics with the run's config, where every layout's save finds them."""
    config.__dict__["normalization"] = norm


def attached(config) -> Normalization | None:
    return config.__dict__.get("normalization")
