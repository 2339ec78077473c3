"""Data-parallel training equals the one-process run, reads only its own rows, and learns."""

import dataclasses
import os

import numpy as np
import pytest
from mpi4py import MPI

from mpitrain.config import TrainConfig, validate
from mpitrain.data import synth
from mpitrain.data.hdf5 import H5Dataset
from mpitrain.data.rank import load_rank_data
from mpitrain.train import train
from harness import write_on_root


def config(**overrides) -> TrainConfig:
    base = dict(model="12-16-3", batch_size=18, dtype="float64", device="cpu", progress=False,
                sampler="global", val_fraction=0.1, seed=5)
    return validate(dataclasses.replace(TrainConfig(), **{**base, **overrides}))


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("adam", 0.01)])
@pytest.mark.parametrize("algorithm", ["ring", "mpi"])
def test_parameters_match_one_process_run(comm, small_classification, optimizer, lr, algorithm):
    """20 steps on `comm` equal 20 steps on one process over the same global batches (float64)."""
    settings = config(data=small_classification, optimizer=optimizer, lr=lr, momentum=0.9 if optimizer == "sgd" else 0.0,
                      steps=20, allreduce=algorithm)
    distributed = train(settings, comm)
    serial = train(dataclasses.replace(settings), MPI.COMM_SELF)
    assert distributed.parameters.keys() == serial.parameters.keys()
    for name, value in serial.parameters.items():
        np.testing.assert_allclose(distributed.parameters[name], value, rtol=1e-10, atol=1e-12, err_msg=name)
    initial = train(dataclasses.replace(settings, steps=0), MPI.COMM_SELF).parameters
    assert any(not np.allclose(initial[name], value) for name, value in serial.parameters.items()), "nothing trained"


def test_every_rank_holds_identical_parameters(comm, small_classification):
    result = train(config(data=small_classification, sampler="shard", steps=6), comm)
    flat = np.concatenate([value.ravel() for value in result.parameters.values()])
    gathered = comm.allgather(flat)
    np.testing.assert_array_equal(gathered[comm.rank], gathered[0])


@pytest.mark.parametrize("sampler,partition", [("shard", "uniform"), ("shard", "stratified"), ("global", "uniform")])
def test_each_rank_reads_only_its_own_rows(comm, small_classification, sampler, partition):
    """Every selection handed to h5py lies inside this rank's rows; ranks' training rows are disjoint."""
    settings = config(data=small_classification, sampler=sampler, partition=partition)
    dataset = H5Dataset(small_classification)
    dataset.trace = True
    data = load_rank_data(dataset, settings, 3, comm)
    everyone = comm.allgather(data.own_rows)
    x_rows = set(dataset.rows_read("x").tolist())
    y_rows = set(dataset.rows_read("y").tolist())
    allowed = set(data.val_rows.tolist()) | set(data.own_rows.tolist())
    assert x_rows <= allowed, f"read x rows outside this rank's share: {sorted(x_rows - allowed)[:5]}"
    if not (partition == "stratified" and comm.rank == 0):  # rank 0 reads the label column for everyone
        assert y_rows <= allowed
    assert sum(len(rows) for rows in everyone) == len(np.unique(np.concatenate(everyone)))
    assert len(x_rows) < dataset.n_rows or comm.size == 1


def test_linear_regression_recovers_theta(comm, shared_dir):
    x, y = synth.make_linreg(10000, seed=1)
    path = write_on_root(comm, os.path.join(shared_dir, "linreg.h5"), x, y)
    settings = config(data=path, model="2-1", loss="mse", optimizer="adam", lr=0.1, batch_size=100, epochs=10, schedule="cosine",
                      sampler="shard")
    theta = train(settings, comm).parameters["0/weight"].ravel()
    np.testing.assert_allclose(theta, [2.0, 3.0], atol=0.1)


def test_default_mlp_reaches_95_percent(comm):
    """The reference 784-1024-10 MLP with its default optimizer learns the synthetic set in 3 epochs."""
    settings = validate(dataclasses.replace(TrainConfig(), synth_samples=4000, device="cpu", progress=False))
    history = train(settings, comm).history
    assert history[-1]["val_accuracy"] >= 0.95, history
    assert history[0]["world_size"] == comm.size


def test_steps_zero_saves_initial_parameters(comm, small_classification, shared_dir):
    from mpitrain.checkpoint import load_parameters
    from mpitrain.nn.model import Model

    path = os.path.join(shared_dir, "init.h5")
    train(config(data=small_classification, steps=0, save=path), comm)
    saved = load_parameters(path)
    expected = Model([12, 16, 3], "relu", xp=np, dtype=np.float64, seed=5).state()
    assert saved.keys() == expected.keys() == {"0/weight", "0/bias", "1/weight", "1/bias"}
    for name in expected:
        np.testing.assert_array_equal(saved[name], expected[name])


def test_metrics_file_has_one_line_per_epoch_and_a_final_one(comm, small_classification, shared_dir):
    import json

    path = os.path.join(shared_dir, "metrics.jsonl")
    train(config(data=small_classification, epochs=2, metrics=path), comm)
    comm.Barrier()
    records = [json.loads(line) for line in open(path)]
    assert [r.get("epoch") for r in records] == [1, 2, None]
    assert records[-1]["final"] is True and records[-1]["steps"] == records[1]["step"]
    for key in ("epoch", "step", "loss", "val_loss", "val_accuracy", "samples_per_s", "world_size"):
        assert key in records[0], key
    assert records[0]["world_size"] == comm.size
