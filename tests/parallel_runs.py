"""Tiny training runs under a (DP, TP, PP) layout, and the one-process oracle they must equal."""

import dataclasses

import numpy as np
import pytest
from mpi4py import MPI

from groups import groups_of
from mpitrain.config import TrainConfig, validate
from mpitrain.report import TrainResult
from mpitrain.train import train

# Four dense layers (so four stages fit); hidden widths 10, 9, 7 are not all divisible by 2 or 4.
MODEL = "12-10-9-7-3"
RTOL = 1e-10
SERIAL_ONLY = dict(tp=1, pp=1, micro_batches=1, stages=None)


def config(**overrides) -> TrainConfig:
    base = dict(model=MODEL, batch_size=12, dtype="float64", device="cpu", progress=False, sampler="global",
                val_fraction=0.1, seed=5, optimizer="adam", lr=0.01, steps=10)
    return validate(dataclasses.replace(TrainConfig(), **{**base, **overrides}))


def serial_run(**overrides) -> TrainResult:
    """The same run on one process with no tensor or pipeline parallelism."""
    return train(config(**{**overrides, **SERIAL_ONLY}), MPI.COMM_SELF)


def layout_run(comm, layout: tuple[int, int, int], **overrides) -> TrainResult | None:
    """Train on the first DP*TP*PP ranks of comm (skipped when comm is smaller); None on the other ranks."""
    dp, tp, pp = layout
    with groups_of(comm, dp * tp * pp) as group:
        return None if group is None else train(config(tp=tp, pp=pp, **overrides), group)


def assert_same_run(result: TrainResult | None, expected: TrainResult) -> None:
    """Same final parameters and same reported losses, to 1e-10 relative."""
    if result is None:
        return
    assert result.parameters.keys() == expected.parameters.keys()
    for name, value in expected.parameters.items():
        np.testing.assert_allclose(result.parameters[name], value, rtol=RTOL, atol=RTOL * np.abs(value).max(),
                                   err_msg=name)
    for key in ("loss", "val_loss", "val_accuracy"):
        assert result.history[-1][key] == pytest.approx(expected.history[-1][key], rel=RTOL), key
