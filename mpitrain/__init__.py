"""mpitrain: data-, tensor- and pipeline-parallel training over MPI with NumPy or CuPy.

    from mpitrain import TrainConfig, train, evaluate
    result = train(TrainConfig(model="784-256-10", epochs=2, save="model.h5"))   # every rank of the job
    metrics = evaluate("model.h5", "test.h5")

The names below are imported on first use, so `import mpitrain` alone starts neither MPI nor NumPy.
"""

import importlib

__version__ = "0.1.0"

# name -> module that defines it. `train` and `evaluate` are modules that can be called (train.py,
# evaluate.py): `train(config)` runs mpitrain.train.train, `evaluate(...)` mpitrain.evaluate.evaluate_file.
_PUBLIC = {"TrainConfig": "mpitrain.config", "MpitrainError": "mpitrain.errors", "Callback": "mpitrain.callbacks",
           "TrainResult": "mpitrain.report", "Preempted": "mpitrain.preempt",
           "train": "mpitrain.train", "evaluate": "mpitrain.evaluate"}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mpitrain' has no attribute {name!r}")
    module = importlib.import_module(_PUBLIC[name])
    return module if name in ("train", "evaluate") else getattr(module, name)
