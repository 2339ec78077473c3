"""One rank's data: the dataset checked against the model, this rank's training and validation
rows, and the batches it walks through. The same for every layout: a data-parallel group's ranks
call it on the group's communicator (the ranks of a tensor group or pipeline read the same rows).

    dataset = open_dataset(config, widths, comm)         # collective: every rank fails alike
    data = load_rank_data(dataset, config, classes, comm)  # reads only this rank's rows; fits --normalize
    for x, y in Batches(data, dataset, backend, config).epoch(epoch, count): ...
"""

import itertools
import os
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from mpitrain.backend import Backend
from mpitrain.comm import agree, node_comm
from mpitrain.config import TrainConfig
from mpitrain.data import cache, normalize, partition, synth
from mpitrain.data.hdf5 import H5Dataset
from mpitrain.data.labels import label_format
from mpitrain.data.sampler import GlobalSampler, ShardSampler, local_steps
from mpitrain.errors import MpitrainError, error_of
from mpitrain.outputs import write_error


def synthetic_path(config: TrainConfig, features: int, classes: int, folder: str | None = None) -> str:
    """Where the default synthetic set lives: a node-local cache keyed by its parameters, in this
    user's private folder of the temp folder (data/cache.py)."""
    name = f"mpitrain-synth-{config.synth_samples}x{features}-c{classes}-s{config.seed}.h5"
    return os.path.join(folder or cache.private_folder(), name)


def ensure_synthetic(config: TrainConfig, widths: list[int], comm: MPI.Intracomm) -> str:
    """The synthetic classification set, written once per node unless a trusted copy is cached
    (data/cache.py: ours, private, digest checked); collective on comm."""
    node = node_comm(comm)
    path, error = None, None
    if node.rank == 0:
        try:
            path = synthetic_path(config, widths[0], widths[-1])
            if not cache.trusted(path):
                x, y = synth.make_classification(config.synth_samples, widths[0], widths[-1], config.seed)
                synth.write_h5(path, x, y)
                cache.seal(path)
        except MpitrainError as exc:
            error = exc
        except OSError as exc:
            error = write_error(path or tempfile.gettempdir(), exc)
    path = node.bcast(path, root=0)
    node.Free()
    agree(comm, error)
    return path


def check_dataset(dataset: H5Dataset, config: TrainConfig, widths: list[int]) -> None:
    """The dataset fits the model and the loss: feature count and label shape. Sets how rows are
    turned into model inputs (the run's dtype) and labels (labels.label_format)."""
    if dataset.n_features != widths[0]:
        shape = "" if len(dataset.x_row_shape) == 1 else f" (rows of shape {dataset.x_row_shape}, flattened)"
        raise MpitrainError(f"{config.data}: x has {dataset.n_features} features{shape} but --model {config.model} "
                            f"expects {widths[0]}")
    try:
        dataset.labels = label_format(dataset.y_row_shape, dataset.y_dtype, config.loss, widths[-1])
    except MpitrainError as exc:
        raise MpitrainError(f"{config.data}: {exc} (--model {config.model})") from None
    dataset.x_out_dtype = np.dtype(config.dtype)


def check_labels(y: np.ndarray, config: TrainConfig, classes: int) -> None:
    """Model labels (after labels.to_model) have the shape the loss takes; values were checked as read."""
    expected = (len(y),) if config.loss == "ce" else None
    if expected is not None and y.shape != expected:
        raise MpitrainError(f"{config.data}: labels of shape {y.shape} reached --loss ce, which needs {expected}")


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


def _read(dataset, rows, config, classes):
    """(x, y, error) of `rows`: an error is returned, not raised, so the ranks can agree on it."""
    try:
        x, y = dataset.read(rows)
        check_labels(y, config, classes)
        check_finite(x, rows, dataset)
        return x, y, None
    except MpitrainError as exc:
        return None, None, exc


def _fit_normalization(dataset, config, own_x, own_rows, comm):
    """Fit --normalize on the training rows of every rank of comm (each reads only its own). Collective."""
    if config.normalize == "none":
        return None
    blocks = [own_x] if own_x is not None else normalize.row_blocks(dataset.read_x, own_rows)
    return normalize.fit(config.normalize, blocks, dataset.n_features, comm)


def describe_rows(dataset: H5Dataset, n_train: int, n_val: int) -> str:
    """The start-up line on what is read: files, rows, shapes, and the training/validation split."""
    files = f"{len(dataset.paths)} files, " if len(dataset.paths) > 1 else ""
    n = dataset.n_rows
    y = f", {dataset.y_key} {(n, *dataset.y_row_shape)} {dataset.y_dtype}" if dataset.y_key else ""
    return (f"mpitrain: data {dataset.path}: {files}{n} rows ({dataset.x_key} {(n, *dataset.x_row_shape)} "
            f"{dataset.x_dtype}{y}); {n_train} training rows, {n_val} validation rows")


def load_rank_data(dataset: H5Dataset, config: TrainConfig, classes: int, comm: MPI.Intracomm) -> RankData:
    """Split rows, build the sampler, read this rank's rows (never anyone else's) and fit
    --normalize over all ranks' training rows. Collective."""
    train_rows, val_rows = partition.split_validation(dataset.n_rows, config.val_fraction, config.seed)
    agree(comm, error_of(check_sizes, len(train_rows), len(val_rows), config, comm.size))
    if comm.rank == 0 and MPI.COMM_WORLD.rank == 0:
        print(describe_rows(dataset, len(train_rows), len(val_rows)), flush=True)

    own_val_rows = partition.uniform_rows(val_rows, comm.rank, comm.size)
    val_x, val_y, error = _read(dataset, own_val_rows, config, classes)
    if config.sampler == "global":
        sampler = GlobalSampler(train_rows, config.batch_size, comm.rank, comm.size, config.seed)
        own_rows = partition.uniform_rows(train_rows, comm.rank, comm.size)
        own_x, own_y = None, None
        error = error or error_of(lambda: check_labels(dataset.read_y(own_rows), config, classes))
        steps = sampler.steps_per_epoch
    else:
        own_rows = own_training_rows(dataset, train_rows, config, comm)
        own_x, own_y, own_error = _read(dataset, own_rows, config, classes)
        error = error or own_error
        steps = comm.allreduce(local_steps(len(own_rows), config.batch_size, comm.rank, comm.size), op=MPI.MIN)
        sampler = ShardSampler(own_rows, config.batch_size, comm.rank, comm.size, config.seed, steps)
    agree(comm, error)
    norm = _fit_normalization(dataset, config, own_x, own_rows, comm)
    if norm is not None:
        # From here on every read is normalized; the rows already in memory are normalized once.
        dataset.normalizer = norm
        val_x = norm.apply(val_x)
        own_x = norm.apply(own_x) if own_x is not None else None
    normalize.attach(config, norm)
    return RankData(sampler, steps, own_rows, own_val_rows, own_x, own_y, val_x, val_y)


def open_dataset(config: TrainConfig, widths: list[int], comm: MPI.Intracomm) -> H5Dataset:
    """Open and check the dataset on every rank; every rank fails alike if any rank fails. Rank 0
    warns once when --sampler global will decompress chunks again and again. Collective."""
    dataset, error = None, None
    try:
        dataset = H5Dataset(config.data, config.x_key, config.y_key, rereads=config.sampler == "global")
        check_dataset(dataset, config, widths)
    except MpitrainError as exc:
        error = exc
    agree(comm, error)
    dataset.share_blocks(comm)
    if config.sampler == "global" and comm.rank == 0 and MPI.COMM_WORLD.rank == 0:
        local_batch = max(1, config.batch_size // comm.size)
        warning = dataset.reread_warning(local_batch)
        if warning:
            print(warning, file=sys.stderr, flush=True)
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
