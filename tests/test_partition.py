"""Partitions over a simulated world: every rank's share is computed in-process, then the shares are
checked against each other (disjoint, covering, balanced). No MPI: every rank runs the same checks."""

import numpy as np
import pytest

from mpitrain.data.partition import split_validation, stratified_rows, uniform, uniform_rows
from mpitrain.errors import MpitrainError

WORLDS = [1, 2, 3, 4, 7]


def assert_disjoint_cover(parts, rows):
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)), "a row is owned by two ranks"
    np.testing.assert_array_equal(np.sort(joined), np.sort(rows))


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("n", [0, 1, 5, 100, 103])
def test_uniform_blocks_are_contiguous_balanced_and_front_loaded(n, world):
    blocks = [uniform(n, rank, world) for rank in range(world)]
    sizes = [stop - start for start, stop in blocks]
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(blocks[r][1] == blocks[r + 1][0] for r in range(world - 1))
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True), "leftover rows must go to the first ranks"


@pytest.mark.parametrize("world", WORLDS)
def test_uniform_rows_cover_rows(world):
    rows = np.random.default_rng(0).choice(1000, size=103, replace=False)
    assert_disjoint_cover([uniform_rows(rows, rank, world) for rank in range(world)], rows)


def test_rank_outside_world_is_rejected():
    with pytest.raises(ValueError):
        uniform(10, 3, 3)


def imbalanced_labels(n, classes, seed):
    """Labels with class c drawn with weight c + 1, plus one singleton class (fewer rows than ranks)."""
    weights = np.arange(1, classes + 1, dtype=float)
    labels = np.random.default_rng(seed).choice(classes, size=n, p=weights / weights.sum())
    labels[n // 2] = classes
    return labels


@pytest.mark.parametrize("world", WORLDS)
def test_stratified_balances_every_class_and_the_totals(world):
    n_rows = 1000
    train_rows, _ = split_validation(n_rows, 0.1, seed=1)
    labels = imbalanced_labels(n_rows, 5, seed=2)[train_rows]
    parts = [stratified_rows(train_rows, labels, rank, world, seed=3) for rank in range(world)]
    assert_disjoint_cover(parts, train_rows)
    label_of_row = np.full(n_rows, -1)
    label_of_row[train_rows] = labels
    for c in np.unique(labels):
        n_c = int(np.sum(labels == c))
        counts = [int(np.sum(label_of_row[part] == c)) for part in parts]
        assert set(counts) <= {n_c // world, -(-n_c // world)}, f"class {c}: {counts}"
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(np.all(np.diff(p) > 0) for p in parts), "each rank's rows must be sorted"


def test_stratified_is_reproducible_and_seeded():
    rows = np.arange(400)
    labels = imbalanced_labels(400, 4, seed=0)
    first = stratified_rows(rows, labels, 1, 3, seed=5)
    np.testing.assert_array_equal(first, stratified_rows(rows, labels, 1, 3, seed=5))
    assert not np.array_equal(first, stratified_rows(rows, labels, 1, 3, seed=6))


def test_stratified_on_one_class_matches_uniform_sizes():
    rows = np.arange(103)
    for world in WORLDS:
        sizes = [len(stratified_rows(rows, np.zeros(103), rank, world, seed=0)) for rank in range(world)]
        assert sizes == [stop - start for start, stop in (uniform(103, r, world) for r in range(world))]


@pytest.mark.parametrize("n_rows, fraction", [(1000, 0.1), (7, 0.5), (10, 0.0), (999, 0.333)])
def test_split_validation_is_a_seeded_partition(n_rows, fraction):
    train, val = split_validation(n_rows, fraction, seed=4)
    assert len(val) == round(n_rows * fraction)
    assert_disjoint_cover([train, val], np.arange(n_rows))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    again_train, again_val = split_validation(n_rows, fraction, seed=4)
    np.testing.assert_array_equal(val, again_val)
    np.testing.assert_array_equal(train, again_train)


def test_split_validation_depends_on_seed():
    assert not np.array_equal(split_validation(1000, 0.1, 0)[1], split_validation(1000, 0.1, 1)[1])


@pytest.mark.parametrize("n_rows, fraction", [(100, 1.0), (100, -0.1), (1, 0.6)])
def test_split_validation_rejects_fractions_leaving_no_training_rows(n_rows, fraction):
    with pytest.raises(MpitrainError, match="validation fraction"):
        split_validation(n_rows, fraction, seed=0)
