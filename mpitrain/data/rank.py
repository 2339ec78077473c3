"""One rank's data: the dataset checked against the model, this rank's training and validation
rows, and the batches it walks through. The same for every layout: a data-parallel group's ranks
call it on the group's communicator (the ranks of a tensor group or pipeline read the same rows).

    dataset = open_dataset(config, widths, comm)         # collective: every rank fails alike
    data = load_rank_data(dataset, config, classes, comm)  # reads only this rank's rows
    for x, y in Batches(data, dataset, backend, config).epoch(epoch, count): ...
"""

import itertools
import os
import tempfile
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from mpitrain.backend import Backend
from mpitrain.comm import agree, node_comm
from mpitrain.config import TrainConfig
from mpitrain.data import partition, synth
from mpitrain.data.hdf5 import H5Dataset
from mpitrain.data.sampler import GlobalSampler, ShardSampler, local_steps
from mpitrain.errors import MpitrainError, error_of




def synthetic_path(config: TrainConfig, features: int, classes: int) -> str:
    """Where the default synthetic set lives: a node-local cache keyed by its parameters."""
    name = f"mpitrain-synth-{config.synth_samples}x{features}-c{classes}-s{config.seed}.h5"
    return os.path.join(tempfile.gettempdir(), name)


def ensure_synthetic(config: TrainConfig, widths: list[int], comm: MPI.Intracomm) -> str:
    """Write the synthetic classification set once per node (if missing); collective on comm."""
    path = synthetic_path(config, widths[0], widths[-1])
    node = node_comm(comm)
    error = None
    if node.rank == 0 and not os.path.exists(path):
        try:
            x, y = synth.make_classification(config.synth_samples, widths[0], widths[-1], config.seed)
            synth.write_h5(path, x, y)
        except (OSError, MpitrainError) as exc:
            error = MpitrainError(f"{path}: cannot write the synthetic set ({exc})")
    node.Free()
    agree(comm, error)
    return path


def check_dataset(dataset: H5Dataset, config: TrainConfig, widths: list[int]) -> None:
    """The dataset fits the model and the loss: feature count, label kind and label range."""
    if dataset.n_features != widths[0]:
        raise MpitrainError(
            f"{config.data}: x has {dataset.n_features} features but --model {config.model} expects {widths[0]}"
        )
    if config.loss == "ce" and not dataset.is_classification:
        raise MpitrainError(f"{config.data}: y has dtype {dataset.y_dtype}; --loss ce needs integer class labels")
    if config.loss == "mse" and dataset.y_width != widths[-1]:
        raise MpitrainError(
            f"{config.data}: y has {dataset.y_width} columns but --model {config.model} has {widths[-1]} outputs"
        )


def check_labels(y: np.ndarray, config: TrainConfig, classes: int) -> None:
    """Class labels lie in [0, classes); regression targets are finite."""
    if y.size == 0:
        return
    if config.loss == "ce":
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= classes:
            bad = low if low < 0 else high
            raise MpitrainError(f"{config.data}: label {bad} in 'y' is outside [0, {classes}) for --model {config.model}")
    elif not np.all(np.isfinite(y)):
        raise MpitrainError(f"{config.data}: 'y' holds NaN or Inf")


def nonfinite_row(x: np.ndarray, rows: np.ndarray, dataset: H5Dataset) -> str | None:
    """'FILE: row R of x holds NaN or Inf' for the first bad row of x (read from global `rows`), or None.

    One bad input would turn every parameter into NaN after the gradient sum, so inputs are checked
    where they are read and the message names the row in its file, not in this rank's share.
    """
    if not x.size:
        return None
    bad = ~np.isfinite(x).all(axis=tuple(range(1, x.ndim)))
    if not bad.any():
        return None
    path, row = dataset.locate(int(np.asarray(rows)[int(np.flatnonzero(bad)[0])]))
    return f"{path}: row {row} of dataset 'x' holds NaN or Inf"


def check_finite(x: np.ndarray, rows: np.ndarray, dataset: H5Dataset) -> None:
    """Raise MpitrainError naming the file and row when x (dataset rows `rows`) holds NaN or Inf."""
    message = nonfinite_row(x, rows, dataset)
    if message:
        raise MpitrainError(message)


def check_sizes(n_train: int, n_val: int, config: TrainConfig, world: int) -> None:
    """Enough rows for one global batch, and a global batch that gives every rank a sample."""
    if config.batch_size < world:
        raise MpitrainError(f"--batch-size {config.batch_size} is smaller than the world size {world}")
    if n_train < config.batch_size:
        raise MpitrainError(
            f"{config.data}: {n_train} training rows are fewer than one global batch of {config.batch_size}"
        )
    if config.val_fraction > 0 and n_val < world:
        raise MpitrainError(f"{config.data}: {n_val} validation rows are fewer than the world size {world}")


@dataclass
class RankData:
    """The rows this rank trains and validates on, and how it walks through them."""

    sampler: GlobalSampler | ShardSampler
    steps_per_epoch: int
    own_rows: np.ndarray
    val_rows: np.ndarray
    own_x: np.ndarray | None
    own_y: np.ndarray | None
    val_x: np.ndarray
    val_y: np.ndarray


def own_training_rows(dataset, train_rows, config, comm) -> np.ndarray:
    """This rank's training rows under --partition. Stratified needs every label: rank 0 reads
    the y column once and broadcasts it, rather than every rank reading the whole column."""
    if config.partition == "uniform":
        return partition.uniform_rows(train_rows, comm.rank, comm.size)
    labels, error = None, None
    if comm.rank == 0:
        try:
            labels = dataset.read_labels()
        except MpitrainError as exc:
            error = exc
    agree(comm, error)
    labels = comm.bcast(labels, root=0)
    return partition.stratified_rows(train_rows, labels[train_rows], comm.rank, comm.size, config.seed)


def load_rank_data(dataset: H5Dataset, config: TrainConfig, classes: int, comm: MPI.Intracomm) -> RankData:
    """Split rows, build the sampler and read this rank's rows (never anyone else's). Collective."""
    train_rows, val_rows = partition.split_validation(dataset.n_rows, config.val_fraction, config.seed)
    agree(comm, error_of(check_sizes, len(train_rows), len(val_rows), config, comm.size))

    own_val_rows = partition.uniform_rows(val_rows, comm.rank, comm.size)
    val_x, val_y = dataset.read(own_val_rows)
    error = error_of(check_labels, val_y, config, classes) or error_of(check_finite, val_x, own_val_rows, dataset)
    if config.sampler == "global":
        sampler = GlobalSampler(train_rows, config.batch_size, comm.rank, comm.size, config.seed)
        own_rows = partition.uniform_rows(train_rows, comm.rank, comm.size)
        own_x, own_y = None, None
        error = error or error_of(check_labels, dataset.read_y(own_rows), config, classes)
        steps = sampler.steps_per_epoch
    else:
        own_rows = own_training_rows(dataset, train_rows, config, comm)
        own_x, own_y = dataset.read(own_rows)
        error = (error or error_of(check_labels, own_y, config, classes)
                 or error_of(check_finite, own_x, own_rows, dataset))
        steps = comm.allreduce(local_steps(len(own_rows), config.batch_size, comm.rank, comm.size), op=MPI.MIN)
        sampler = ShardSampler(own_rows, config.batch_size, comm.rank, comm.size, config.seed, steps)
    agree(comm, error)
    return RankData(sampler, steps, own_rows, own_val_rows, own_x, own_y, val_x, val_y)


def open_dataset(config: TrainConfig, widths: list[int], comm: MPI.Intracomm) -> H5Dataset:
    """Open and check the dataset on every rank; every rank fails alike if any rank fails."""
    dataset, error = None, None
    try:
        dataset = H5Dataset(config.data)
        check_dataset(dataset, config, widths)
    except MpitrainError as exc:
        error = exc
    agree(comm, error)
    return dataset


class Batches:
    """Device-resident batches for this rank: from memory (shard sampler) or one read per step (global)."""

    def __init__(self, data: RankData, dataset: H5Dataset, backend: Backend, config: TrainConfig):
        self.data, self.dataset, self.backend = data, dataset, backend
        # Set when the last batch read held a NaN or Inf: the loop's per-step agreement stops every
        # rank with it, since raising here alone would strand the ranks waiting for this one.
        self.bad_input: str | None = None
        self.dtype = np.dtype(config.dtype)
        self.label_dtype = np.int64 if config.loss == "ce" else self.dtype
        if data.own_x is not None:
            self.own_x = backend.xp.asarray(data.own_x, dtype=self.dtype)
            self.own_y = backend.xp.asarray(data.own_y, dtype=self.label_dtype)

    def epoch(self, epoch: int, count: int, start: int = 0):
        """Batches start..count-1 of `epoch` (a resumed run starts inside an epoch)."""
        xp = self.backend.xp
        for rows in itertools.islice(self.data.sampler.batches(epoch), start, count):
            if self.data.own_x is not None:
                index = xp.asarray(rows)
                yield self.own_x[index], self.own_y[index]
            else:
                x, y = self.dataset.read(rows)
                self.bad_input = nonfinite_row(x, rows, self.dataset)
                yield xp.asarray(x, dtype=self.dtype), xp.asarray(y, dtype=self.label_dtype)
