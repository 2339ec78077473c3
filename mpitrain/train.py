"""The data-parallel training loop.

Every rank holds the whole model, reads only its own rows of the HDF5 data, computes the
gradient of its share of the global batch, and the ranks sum their gradients with one
all-reduce of the flat gradient buffer per step. Gradients are scaled by 1/global_batch before
the sum, so the result is the mean over the global batch whatever the world size.

    mpitrain train                      # one process
    mpirun -n 4 mpitrain train          # four ranks, same global batch of 128
"""

import itertools
import json
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from mpitrain import checkpoint
from mpitrain.backend import Backend, limit_blas_threads, select_backend
from mpitrain.comm import agree, node_comm
from mpitrain.comm.buckets import GradientSync
from mpitrain.config import TrainConfig, as_dict
from mpitrain.data import partition, synth
from mpitrain.data.hdf5 import H5Dataset
from mpitrain.data.sampler import GlobalSampler, ShardSampler, local_steps
from mpitrain.errors import MpitrainError
from mpitrain.nn.losses import MeanSquaredError, SoftmaxCrossEntropy
from mpitrain.nn.model import Sequential, parse_widths
from mpitrain.optim import SGD, Adam, schedule
from mpitrain.parallel.state import load_whole_model
from mpitrain.resilience import Resilience


@dataclass
class TrainResult:
    """What a run leaves behind: final parameters (host copies) and one record per epoch."""

    parameters: dict[str, np.ndarray]
    history: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------- data


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


def check_finite(x: np.ndarray, config: TrainConfig) -> None:
    """Inputs hold no NaN or Inf: one bad value would turn every parameter into NaN after the all-reduce."""
    if x.size and not np.all(np.isfinite(x)):
        row = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise MpitrainError(f"{config.data}: dataset 'x' holds NaN or Inf (row {row} of this rank's share)")


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
    agree(comm, _error_of(check_sizes, len(train_rows), len(val_rows), config, comm.size))

    own_val_rows = partition.uniform_rows(val_rows, comm.rank, comm.size)
    val_x, val_y = dataset.read(own_val_rows)
    error = _error_of(check_labels, val_y, config, classes) or _error_of(check_finite, val_x, config)
    if config.sampler == "global":
        sampler = GlobalSampler(train_rows, config.batch_size, comm.rank, comm.size, config.seed)
        own_rows = partition.uniform_rows(train_rows, comm.rank, comm.size)
        own_x, own_y = None, None
        error = error or _error_of(check_labels, dataset.read_y(own_rows), config, classes)
        steps = sampler.steps_per_epoch
    else:
        own_rows = own_training_rows(dataset, train_rows, config, comm)
        own_x, own_y = dataset.read(own_rows)
        error = error or _error_of(check_labels, own_y, config, classes) or _error_of(check_finite, own_x, config)
        steps = comm.allreduce(local_steps(len(own_rows), config.batch_size, comm.rank, comm.size), op=MPI.MIN)
        sampler = ShardSampler(own_rows, config.batch_size, comm.rank, comm.size, config.seed, steps)
    agree(comm, error)
    return RankData(sampler, steps, own_rows, own_val_rows, own_x, own_y, val_x, val_y)


def _error_of(check, *args) -> MpitrainError | None:
    """Run a check and return its error instead of raising, so ranks can agree on it first."""
    try:
        check(*args)
    except MpitrainError as exc:
        return exc
    return None


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


# ---------------------------------------------------------------------------- model and step


def make_model(config: TrainConfig, widths: list[int], backend: Backend) -> Sequential:
    return Sequential(widths, config.activation, xp=backend.xp, dtype=np.dtype(config.dtype), seed=config.seed)


def make_optimizer(config: TrainConfig, model: Sequential):
    if config.optimizer == "adam":
        return Adam(model.params, model.grads, lr=config.lr, weight_decay=config.weight_decay)
    return SGD(model.params, model.grads, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def make_loss(config: TrainConfig, backend: Backend):
    return SoftmaxCrossEntropy(backend.xp) if config.loss == "ce" else MeanSquaredError(backend.xp)


def evaluate(model, loss, x, y, config, comm) -> dict:
    """Validation loss and accuracy over every rank's validation rows. Collective on comm."""
    totals = np.zeros(3)
    if len(x):
        out = model.forward(x)
        totals[0] = float(loss.forward(out, y))
        totals[1] = float(loss.correct(out, y)) if config.loss == "ce" else 0.0
        totals[2] = len(x)
    comm.Allreduce(MPI.IN_PLACE, totals, op=MPI.SUM)
    return validation_metrics(totals, config)


def validation_metrics(totals: np.ndarray, config: TrainConfig) -> dict:
    """{val_loss, val_accuracy} from all ranks' summed (loss, correct, rows); {} without rows."""
    if totals[2] == 0:
        return {}
    result = {"val_loss": totals[0] / totals[2]}
    if config.loss == "ce":
        result["val_accuracy"] = totals[1] / totals[2]
    return result


class Batches:
    """Device-resident batches for this rank: from memory (shard sampler) or one read per step (global)."""

    def __init__(self, data: RankData, dataset: H5Dataset, backend: Backend, config: TrainConfig):
        self.data, self.dataset, self.backend = data, dataset, backend
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
                # A NaN read here makes this rank's loss non-finite, which the per-step agreement
                # (--on-nan) acts on at every rank alike; raising here alone would strand the others.
                x, y = self.dataset.read(rows)
                yield xp.asarray(x, dtype=self.dtype), xp.asarray(y, dtype=self.label_dtype)


# ---------------------------------------------------------------------------- the loop


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    return config.steps if config.steps is not None else config.epochs * steps_per_epoch


def train(config: TrainConfig, comm: MPI.Intracomm) -> TrainResult:
    """Train under `config` on the ranks of `comm`; every rank returns the same result. Collective.

    Raises mpitrain.preempt.Preempted on every rank when a signal stopped the run at a checkpoint.
    """
    guard = Resilience(config, comm)
    try:
        if config.sync == "ps":
            from mpitrain.parallel.ps import train_ps  # here: ps.py imports this module

            return train_ps(config, guard.comm)
        if config.tp > 1 or config.pp > 1 or config.micro_batches > 1:
            from mpitrain.parallel.train import grid_train  # here: the grid loop imports this module

            return grid_train(config, guard.comm)
        return _train(config, guard.comm, guard)
    finally:
        guard.close()


@dataclass
class RankSetup:
    """What one data-parallel rank trains with: its backend, rows, batches, model and loss."""

    backend: Backend
    dataset: H5Dataset
    data: RankData
    batches: Batches
    model: Sequential
    loss: SoftmaxCrossEntropy | MeanSquaredError
    val_x: object
    val_y: object


def prepare_rank(config: TrainConfig, widths: list[int], comm: MPI.Intracomm) -> RankSetup:
    """Backend, dataset, this rank's rows, model and loss for data parallelism over comm. Collective."""
    backend = select_backend(config.device, comm)
    if config.data is None:
        config.data = ensure_synthetic(config, widths, comm)
    dataset = open_dataset(config, widths, comm)
    data = load_rank_data(dataset, config, widths[-1], comm)
    batches = Batches(data, dataset, backend, config)
    model, loss = make_model(config, widths, backend), make_loss(config, backend)
    val_x = backend.xp.asarray(data.val_x, dtype=np.dtype(config.dtype))
    val_y = backend.xp.asarray(data.val_y, dtype=batches.label_dtype)
    return RankSetup(backend, dataset, data, batches, model, loss, val_x, val_y)


def _train(config: TrainConfig, comm: MPI.Intracomm, guard: Resilience) -> TrainResult:
    widths = parse_widths(config.model)
    threads = limit_blas_threads(comm, config.threads)
    rank = prepare_rank(config, widths, comm)
    backend, dataset, data, batches = rank.backend, rank.dataset, rank.data, rank.batches
    model, loss, val_x, val_y = rank.model, rank.loss, rank.val_x, rank.val_y
    if config.init_from:
        load_whole_model(config.init_from, model, comm)
    optimizer = make_optimizer(config, model)
    grad_sync = GradientSync(model.grads, model.layer_grad_slices(), comm, config.allreduce, config.bucket_mb, config.overlap)
    steps = total_steps(config, data.steps_per_epoch)
    scale = 1.0 / config.batch_size
    is_root = comm.rank == 0
    report = Reporter(config, comm.size, steps, is_root)
    report.start(backend, threads)
    start = guard.start(model, optimizer, dataset, data.steps_per_epoch, steps, report.say)

    step, epoch, position = start.step, start.epoch, start.position
    while step < steps:
        started, loss_sum, kept_steps, epoch_steps = time.perf_counter(), 0.0, 0, 0
        for x, y in batches.epoch(epoch, min(data.steps_per_epoch, position + steps - step), start=position):
            out = model.forward(x)
            step_loss = float(loss.forward(out, y))
            model.backward(loss.backward(scale), on_layer_done=grad_sync.layer_done)
            grad_sync.wait()
            if guard.keep_step(step_loss, model.grads):
                optimizer.step(schedule(config.schedule, config.lr, step, steps, config.warmup_steps))
                loss_sum += step_loss
                kept_steps += 1
            step += 1
            position += 1
            epoch_steps += 1
            report.advance()
            guard.boundary(step, epoch, position)
        backend.synchronize()
        elapsed = time.perf_counter() - started
        totals = comm.allreduce(loss_sum, op=MPI.SUM)
        record = {
            "epoch": epoch + 1,
            "step": step,
            "loss": totals / max(kept_steps * config.batch_size, 1),
            "samples_per_s": epoch_steps * config.batch_size / elapsed if elapsed > 0 else 0.0,
            "world_size": comm.size,
            **evaluate(model, loss, val_x, val_y, config, comm),
            **guard.metrics(),
        }
        report.epoch(record)
        if position == data.steps_per_epoch:
            epoch, position = epoch + 1, 0
        guard.boundary(step, epoch, position)

    guard.finish(step, epoch, position)
    result = TrainResult(model.state(), report.history)
    report.finish(result)
    if config.save:
        save_model(config, result, comm)
    dataset.close()
    return result


def save_model(config: TrainConfig, result: TrainResult, comm: MPI.Intracomm) -> None:
    """Rank 0 writes the final parameters; every rank learns whether the write worked."""
    error = None
    if comm.rank == 0:
        attrs = {"model": config.model, "activation": config.activation, "config": json.dumps(as_dict(config))}
        error = _error_of(checkpoint.save_parameters, config.save, result.parameters, attrs)
    agree(comm, error)


# ---------------------------------------------------------------------------- reporting


class Reporter:
    """Rank 0's progress bar, per-epoch lines and metrics JSONL; other ranks only keep the history."""

    def __init__(self, config: TrainConfig, world: int, steps: int, is_root: bool):
        self.config, self.world, self.steps, self.is_root = config, world, steps, is_root
        self.history: list[dict] = []
        self.bar = None
        self.metrics = None

    def start(self, backend: Backend, threads: int) -> None:
        if not self.is_root:
            return
        if self.config.metrics:
            try:
                # A resumed run continues its metrics file.
                self.metrics = open(self.config.metrics, "a" if self.config.resume else "w")
            except OSError as exc:
                raise MpitrainError(f"--metrics {self.config.metrics}: {exc.strerror}") from None
        self.say(
            f"mpitrain: {self.world} rank(s), {backend.describe()}, {threads} BLAS thread(s) per rank, "
            f"model {self.config.model}, {self.steps} steps of {self.config.batch_size} samples, data {self.config.data}"
        )
        if self.config.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=self.steps, unit="step", dynamic_ncols=True, leave=False)

    def say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def write(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def epoch(self, record: dict) -> None:
        self.history.append(record)
        if not self.is_root:
            return
        accuracy = f", val_accuracy {record['val_accuracy']:.4f}" if "val_accuracy" in record else ""
        val = f", val_loss {record['val_loss']:.4f}" if "val_loss" in record else ""
        self.say(
            f"epoch {record['epoch']} step {record['step']}: loss {record['loss']:.4f}{val}{accuracy}, "
            f"{record['samples_per_s']:.0f} samples/s"
        )
        self.write(record)

    def finish(self, result: TrainResult) -> None:
        if not self.is_root:
            return
        if self.bar is not None:
            self.bar.close()
        final = dict(self.history[-1]) if self.history else {"step": 0, "world_size": self.world}
        final["final"] = True
        self.write(final)
        if self.metrics is not None:
            self.metrics.close()
