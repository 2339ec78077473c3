"""Samplers over a simulated world: every rank's sampler is built in-process and the per-rank batches
are checked against each other and against the world-size-1 run (the serial oracle). No MPI."""

import numpy as np
import pytest

from mpitrain.data.partition import split_validation, uniform_rows
from mpitrain.data.sampler import GlobalSampler, ShardSampler, local_batch_sizes, local_steps
from mpitrain.errors import MpitrainError

GLOBAL_BATCH = 10  # not a multiple of 3 or 4, so uneven local batches are exercised


@pytest.mark.parametrize("world", [1, 2, 3, 4, 10])
def test_local_batch_sizes_sum_and_front_load(world):
    sizes = local_batch_sizes(GLOBAL_BATCH, world)
    assert sum(sizes) == GLOBAL_BATCH and len(sizes) == world
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_global_batch_smaller_than_world_is_rejected():
    with pytest.raises(MpitrainError, match="global batch 3 is smaller than the world size 4"):
        local_batch_sizes(3, 4)


def global_batches(train_rows, world, epoch, seed=7):
    """Per step: the global batch (union of every rank's slice) and the list of rank slices."""
    per_rank = [list(GlobalSampler(train_rows, GLOBAL_BATCH, rank, world, seed).batches(epoch))
                for rank in range(world)]
    return [(np.sort(np.concatenate(slices)), slices) for slices in zip(*per_rank)]


@pytest.fixture
def train_rows():
    return split_validation(97, 0.2, seed=0)[0]


def test_global_sampler_batches_do_not_depend_on_world_size(train_rows):
    for epoch in range(2):
        serial = [batch for batch, _ in global_batches(train_rows, 1, epoch)]
        assert len(serial) == len(train_rows) // GLOBAL_BATCH
        for world in [2, 3, 4]:
            steps = global_batches(train_rows, world, epoch)
            assert len(steps) == len(serial)
            for (batch, slices), expected in zip(steps, serial):
                np.testing.assert_array_equal(batch, expected)
                assert sum(len(s) for s in slices) == GLOBAL_BATCH, "rank slices overlap"
                assert [len(s) for s in slices] == local_batch_sizes(GLOBAL_BATCH, world)
                assert all(np.all(np.diff(s) > 0) for s in slices)


def test_global_sampler_epoch_draws_without_replacement(train_rows):
    drawn = np.concatenate([batch for batch, _ in global_batches(train_rows, 3, epoch=0)])
    assert len(np.unique(drawn)) == len(drawn)
    assert np.all(np.isin(drawn, train_rows))


def test_global_sampler_reshuffles_per_epoch_reproducibly(train_rows):
    epoch0 = [b for b, _ in global_batches(train_rows, 2, epoch=0)]
    epoch1 = [b for b, _ in global_batches(train_rows, 2, epoch=1)]
    assert any(not np.array_equal(a, b) for a, b in zip(epoch0, epoch1))
    for a, b in zip(epoch1, [b for b, _ in global_batches(train_rows, 2, epoch=1)]):
        np.testing.assert_array_equal(a, b)
    other_seed = [b for b, _ in global_batches(train_rows, 2, epoch=1, seed=8)]
    assert any(not np.array_equal(a, b) for a, b in zip(epoch1, other_seed))


def test_global_sampler_needs_one_full_batch():
    with pytest.raises(MpitrainError, match="fewer than one global batch"):
        GlobalSampler(np.arange(GLOBAL_BATCH - 1), GLOBAL_BATCH, 0, 1, seed=0)


def shard_samplers(n_train, global_batch, world, seed=3):
    """One ShardSampler per rank over uniform shards, with steps agreed as the MIN over ranks."""
    shards = [uniform_rows(np.arange(n_train), rank, world) for rank in range(world)]
    steps = min(local_steps(len(s), global_batch, r, world) for r, s in enumerate(shards))
    return [ShardSampler(s, global_batch, r, world, seed, steps) for r, s in enumerate(shards)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_sampler_steps_fit_every_rank(world):
    for n_train, global_batch in [(97, GLOBAL_BATCH), (9, 3), (40, 7), (8, 4)]:
        if global_batch < world:
            continue
        samplers = shard_samplers(n_train, global_batch, world)
        assert len({s.steps_per_epoch for s in samplers}) == 1
        for s in samplers:
            batches = list(s.batches(epoch=0))
            assert len(batches) == s.steps_per_epoch
            drawn = np.concatenate(batches)
            assert len(np.unique(drawn)) == len(drawn)
            assert np.all(drawn >= 0) and np.all(drawn < len(s.own_rows))
            assert all(len(b) == s.local_batch and np.all(np.diff(b) > 0) for b in batches)


def test_shard_sampler_steps_can_be_fewer_than_global_batches_per_epoch():
    # Rank 0 owns 5 of 9 rows with local batch 2, so n_train // global_batch = 3 steps would overrun it.
    samplers = shard_samplers(9, 3, 2)
    assert samplers[0].steps_per_epoch < 9 // 3
    with pytest.raises(MpitrainError, match="too few"):
        ShardSampler(samplers[0].own_rows, 3, 0, 2, seed=0, steps_per_epoch=9 // 3)


def test_shard_sampler_epochs_are_reproducible_and_differ():
    first = [list(s.batches(epoch=2)) for s in shard_samplers(97, GLOBAL_BATCH, 3)]
    again = [list(s.batches(epoch=2)) for s in shard_samplers(97, GLOBAL_BATCH, 3)]
    for rank_first, rank_again in zip(first, again):
        for a, b in zip(rank_first, rank_again):
            np.testing.assert_array_equal(a, b)
    other_epoch = list(shard_samplers(97, GLOBAL_BATCH, 3)[0].batches(epoch=3))
    assert any(not np.array_equal(a, b) for a, b in zip(first[0], other_epoch))


def test_shard_sampler_rejects_more_steps_than_rows():
    with pytest.raises(MpitrainError, match="rank 0 owns 5 rows, too few for 2 steps"):
        ShardSampler(np.arange(5), 6, rank=0, world=2, seed=0, steps_per_epoch=2)
