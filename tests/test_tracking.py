"""The plateau schedule, early stopping and --save-best follow the validation loss alike on every
rank, and a resumed run continues them exactly."""

import dataclasses
import os

import numpy as np
import pytest

from mpitrain import MpitrainError, TrainConfig, train
from mpitrain.checkpoint import checkpoint_name, list_checkpoints, load_parameters
from mpitrain.tracking import Tracker


def config(**overrides) -> TrainConfig:
    """Adam at 0.05 on the 480-row set overshoots within a few epochs: plateaus and an early stop."""
    base = dict(model="12-16-3", batch_size=18, dtype="float64", device="cpu", progress=False, sampler="global",
                seed=5, lr=0.05, schedule="plateau", lr_patience=1, lr_decay=0.5, early_stop=3, epochs=20)
    return TrainConfig(**{**base, **overrides})


def replay(losses: list[float], base: float, patience: int, decay: float, early_stop: int) -> tuple[list, int]:
    """The rate of every epoch and the epoch that ends the run, written out from the rules."""
    rates, best, stale, waited, scale = [], float("inf"), 0, 0, 1.0
    for epoch, loss in enumerate(losses, 1):
        rates.append(base * scale)
        if loss < best:
            best, stale, waited = loss, 0, 0
        else:
            stale, waited = stale + 1, waited + 1
            if waited >= patience:
                scale, waited = scale * decay, 0
        if stale >= early_stop:
            return rates, epoch
    return rates, len(losses)


def test_tracker_against_the_rules():
    losses = [3.0, 2.0, 2.5, 2.4, 1.0, 1.5, 1.6, 1.7, 1.8]
    tracker = Tracker(TrainConfig(schedule="plateau", lr_patience=2, lr_decay=0.1, early_stop=4, lr=1.0))
    rates, stops = [], []
    for step, loss in enumerate(losses, 1):
        rates.append(tracker.schedule_options(1)["scale"])
        stops.append(tracker.observe({"epoch": step, "step": step, "val_loss": loss})[1])
    expected_rates, last = replay(losses, 1.0, 2, 0.1, 4)
    assert rates[:last] == pytest.approx(expected_rates) and stops.index(True) + 1 == last
    assert tracker.best == {"epoch": 5, "step": 5, "val_loss": 1.0}


def test_plateau_and_early_stop_agree_on_every_rank(comm, small_classification, shared_dir):
    best_file = os.path.join(shared_dir, "best.h5")
    settings = config(data=small_classification, save_best=best_file)
    result = train(settings, comm)
    losses = [record["val_loss"] for record in result.history]
    rates, last = replay(losses, settings.lr, settings.lr_patience, settings.lr_decay, settings.early_stop)
    assert last == len(losses) < settings.epochs, "the run should have stopped early"
    assert [record["lr"] for record in result.history] == pytest.approx(rates)
    assert result.summary["stopped"].startswith("early stop")
    everyone = comm.allgather([(r["step"], r["lr"], r["val_loss"]) for r in result.history])
    assert all(theirs == everyone[0] for theirs in everyone)
    # --save-best holds the parameters of the best epoch: those of the same run cut at that step.
    best = min(result.history, key=lambda record: record["val_loss"])
    assert result.summary["best_step"] == best["step"] and best_file in result.summary["written"]
    cut = train(dataclasses.replace(settings, steps=best["step"], save_best=None, early_stop=None), comm)
    saved = load_parameters(best_file)
    assert saved.keys() == cut.parameters.keys()
    for name, value in cut.parameters.items():
        np.testing.assert_array_equal(saved[name], value, err_msg=name)


def test_a_resumed_run_continues_schedule_patience_and_best(comm, small_classification, shared_dir):
    """Resumed from a checkpoint after a decay, the run ends where the uninterrupted one did, on the
    same bits, with the same rates, stop and best epoch."""
    folder = os.path.join(shared_dir, "ck")
    settings = config(data=small_classification, checkpoint_dir=folder, checkpoint_every=24, keep_checkpoints=20)
    full = train(settings, comm)
    decayed = next(r["step"] for r in full.history if r["lr"] < settings.lr)
    start = max(step for step, _ in list_checkpoints(folder) if step <= decayed)
    resumed = train(dataclasses.replace(settings, checkpoint_dir=os.path.join(shared_dir, "again"),
                                        resume=os.path.join(folder, checkpoint_name(start))), comm)
    assert resumed.history and _same_numbers(resumed, full, start)
    for key in ("steps", "stopped", "best_step", "best_val_loss"):
        assert resumed.summary[key] == full.summary[key], key
    for name, value in full.parameters.items():
        np.testing.assert_array_equal(resumed.parameters[name], value, err_msg=name)


def _same_numbers(resumed, full, start) -> bool:
    """The arithmetic fields of the epochs after `start` (timings differ between runs)."""
    keys = ("epoch", "step", "loss", "val_loss", "val_accuracy", "lr")
    later = [r for r in full.history if r["step"] > start]
    return [[r[k] for k in keys] for r in resumed.history] == [[r[k] for k in keys] for r in later]


def test_a_run_stopped_early_stays_stopped_on_resume(comm, small_classification, shared_dir):
    folder = os.path.join(shared_dir, "ck")
    settings = config(data=small_classification, checkpoint_dir=folder)
    first = train(settings, comm)
    again = train(dataclasses.replace(settings, resume="auto"), comm)
    assert again.history == [] and again.summary["steps"] == first.summary["steps"]
    assert again.summary["stopped"] == first.summary["stopped"]
    patient = train(dataclasses.replace(settings, resume="auto", early_stop=None, epochs=len(first.history) + 1), comm)
    assert [r["epoch"] for r in patient.history] == [len(first.history) + 1] and patient.summary["stopped"] is None


def test_tracking_state_from_a_checkpoint_is_checked():
    tracker = Tracker(TrainConfig())
    for bad in ({"lr_scale": 2.0}, {"lr_scale": "x"}, {"stale_epochs": -1}, {"best": {"val_loss": "low"}}):
        state = {**tracker.state(0.0), **bad}
        with pytest.raises(MpitrainError, match="ck.h5: checkpoint field 'tracking/"):
            tracker.load_state(state, "ck.h5")
    tracker.load_state(None, "old.h5")  # a checkpoint from before tracking: the defaults stay
    assert tracker.lr_scale == 1.0 and tracker.best is None
