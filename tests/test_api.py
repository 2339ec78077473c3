"""The Python API: `from mpitrain import TrainConfig, train, evaluate`, and the example that uses it."""

import os
import subprocess
import sys

import numpy as np

import mpitrain
from harness import run_on_root
from mpitrain import TrainConfig, evaluate, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_and_evaluate_are_the_library_functions(comm, small_classification, shared_dir):
    """train(config) is mpitrain.train.train on every rank of the job; evaluate(file, data) gives
    what the `mpitrain eval` code computes from the same model and rows."""
    from mpitrain.evaluate import evaluate as evaluate_rows, open_data, open_model

    saved = os.path.join(shared_dir, "m.h5")
    config = TrainConfig(data=small_classification, model="12-16-3", batch_size=18, dtype="float64", device="cpu",
                         progress=False, steps=6, save=saved)
    result = train(config, comm)
    assert list(result.parameters) == ["0/weight", "0/bias", "1/weight", "1/bias"]
    assert result.history and result.summary["steps"] == 6
    direct = mpitrain.train.train(config, comm)
    for name, value in direct.parameters.items():
        np.testing.assert_array_equal(result.parameters[name], value)
    metrics = evaluate(saved, small_classification, comm=comm, device="cpu")
    model = open_model(saved, np, comm)
    expected = evaluate_rows(model, open_data(small_classification, model, "x", "y", comm), np, comm)
    assert metrics == expected


def test_importing_the_package_starts_nothing():
    code = "import sys, mpitrain; assert 'mpi4py' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": ROOT})


def test_the_example_runs(comm):
    done = run_on_root(comm, [sys.executable, os.path.join(ROOT, "examples", "api.py")], timeout=90,
                       PYTHONPATH=ROOT)
    assert done["returncode"] == 0, done
    assert "refused: --optimizer 'rmsprop': expected one of adam, sgd" in done["stdout"]
    assert "stopped: stopped by a callback" in done["stdout"] and "mpitrain: done" in done["stdout"]
