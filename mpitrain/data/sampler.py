"""Which rows each rank uses at each step of an epoch.

ShardSampler: every rank shuffles only the rows it owns (read once, kept in memory); the global batch
is whatever the ranks' local batches add up to. GlobalSampler: one seeded permutation of all training
rows, cut into global batches that are the same for any world size, each split over the ranks, so a
run on 4 ranks sees exactly the batches of a run on 1 rank.
"""

from collections.abc import Iterator

import numpy as np

from mpitrain.errors import MpitrainError


def local_batch_sizes(global_batch: int, world: int) -> list[int]:
    """Per-rank batch sizes summing to global_batch; the global_batch % world extra samples go one each
    to the first ranks."""
    if global_batch < world:
        raise MpitrainError(f"global batch {global_batch} is smaller than the world size {world}: "
                            "every rank needs at least one sample per step")
    base, extra = divmod(global_batch, world)
    return [base + (rank < extra) for rank in range(world)]


def local_steps(n_own: int, global_batch: int, rank: int, world: int) -> int:
    """Full local batches that rank's n_own rows give; the trainer takes the MIN over ranks (collective
    there) as ShardSampler's steps_per_epoch, so every rank runs the same number of steps."""
    return n_own // local_batch_sizes(global_batch, world)[rank]


def _epoch_rng(*key):
    return np.random.default_rng(list(key))


class ShardSampler:
    """Each step, local_batch positions into own_rows (sorted), from a per-epoch shuffle seeded by
    (seed, epoch, rank); the rows left over after steps_per_epoch batches sit the epoch out."""

    def __init__(self, own_rows: np.ndarray, global_batch: int, rank: int, world: int, seed: int,
                 steps_per_epoch: int):
        self.own_rows = np.asarray(own_rows)
        self.local_batch = local_batch_sizes(global_batch, world)[rank]
        self.rank, self.seed = rank, seed
        self.steps_per_epoch = steps_per_epoch
        if steps_per_epoch < 1 or steps_per_epoch * self.local_batch > len(self.own_rows):
            raise MpitrainError(f"rank {rank} owns {len(self.own_rows)} rows, too few for {steps_per_epoch} "
                                f"steps of local batch {self.local_batch} (global batch {global_batch})")

    def batches(self, epoch: int) -> Iterator[np.ndarray]:
        """Yield steps_per_epoch sorted position arrays into own_rows (index the in-memory shard)."""
        order = _epoch_rng(self.seed, epoch, self.rank).permutation(len(self.own_rows))
        b = self.local_batch
        for step in range(self.steps_per_epoch):
            yield np.sort(order[step * b:(step + 1) * b])


class GlobalSampler:
    """Global batch s of an epoch = permutation(train_rows; seed, epoch)[s*B:(s+1)*B], split over the
    ranks in rank order by local_batch_sizes; yields this rank's part as sorted row ids."""

    def __init__(self, train_rows: np.ndarray, global_batch: int, rank: int, world: int, seed: int):
        self.train_rows = np.asarray(train_rows)
        self.global_batch = global_batch
        sizes = local_batch_sizes(global_batch, world)
        self.local_batch = sizes[rank]
        self.local_start = sum(sizes[:rank])
        self.seed = seed
        self.steps_per_epoch = len(self.train_rows) // global_batch
        if self.steps_per_epoch < 1:
            raise MpitrainError(f"{len(self.train_rows)} training rows are fewer than one global batch "
                                f"of {global_batch}")

    def batches(self, epoch: int) -> Iterator[np.ndarray]:
        """Yield steps_per_epoch sorted arrays of row ids (this rank's slice of each global batch)."""
        perm = _epoch_rng(self.seed, epoch).permutation(self.train_rows)
        a, b, B = self.local_start, self.local_start + self.local_batch, self.global_batch
        for step in range(self.steps_per_epoch):
            yield np.sort(perm[step * B + a:step * B + b])
