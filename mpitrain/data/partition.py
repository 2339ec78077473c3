"""Which rows each rank owns: uniform blocks, class-stratified sets, and the train/validation split.

Pure functions of their arguments, so every rank computes every rank's share without talking.
"""

import numpy as np

from mpitrain.errors import MpitrainError


def _check_rank(rank, world):
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of size {world}")


def uniform(n: int, rank: int, world: int) -> tuple[int, int]:
    """(start, stop) of rank's contiguous block of range(n); the n % world leftover rows go one each
    to the first ranks, so block sizes differ by at most 1."""
    _check_rank(rank, world)
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def uniform_rows(rows: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank's contiguous block of `rows` (sizes as in uniform)."""
    start, stop = uniform(len(rows), rank, world)
    return rows[start:stop]


def stratified_rows(rows: np.ndarray, labels_of_rows: np.ndarray, rank: int, world: int,
                    seed: int) -> np.ndarray:
    """Rank's rows, sorted, holding floor or ceil of n_c / world rows of every class c.

    Rows of each class are shuffled with `seed` and dealt in blocks; each class's n_c % world leftover
    rows go to the ranks after where the previous class's leftovers stopped, so rank totals also differ
    by at most 1.
    """
    _check_rank(rank, world)
    rows, labels = np.asarray(rows), np.asarray(labels_of_rows)
    if labels.shape != rows.shape or rows.ndim != 1:
        raise ValueError(f"labels shape {labels.shape} must equal rows shape {rows.shape} (1-D)")
    # A seeded shuffle, then a stable sort by class, groups rows by class in random order within a class.
    shuffle = np.random.default_rng(seed).permutation(len(rows))
    by_class = shuffle[np.argsort(labels[shuffle], kind="stable")]
    _, class_counts = np.unique(labels, return_counts=True)
    mine, class_start, first_extra_rank = [], 0, 0
    ranks = np.arange(world)
    for n_c in class_counts.tolist():
        base, extra = divmod(n_c, world)
        sizes = base + (((ranks - first_extra_rank) % world) < extra)
        stops = class_start + np.cumsum(sizes)
        mine.append(by_class[stops[rank] - sizes[rank]:stops[rank]])
        class_start += n_c
        first_extra_rank = (first_extra_rank + extra) % world
    return np.sort(rows[np.concatenate(mine)]) if mine else rows[:0].copy()


def split_validation(n_rows: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_rows, val_rows), both sorted: val is a seeded random round(n_rows * val_fraction) rows."""
    if not 0.0 <= val_fraction < 1.0:
        raise MpitrainError(f"validation fraction {val_fraction}: must be in [0, 1)")
    n_val = int(round(n_rows * val_fraction))
    if n_val >= n_rows:
        raise MpitrainError(f"validation fraction {val_fraction} of {n_rows} rows leaves no training rows")
    is_val = np.zeros(n_rows, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n_rows)[:n_val]] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)
