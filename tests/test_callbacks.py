"""Callbacks see the same records on every rank, and one rank's request stops every rank."""

import os

import pytest

from mpitrain import Callback, MpitrainError, TrainConfig, train


def config(**overrides) -> TrainConfig:
    base = dict(model="12-16-3", batch_size=18, dtype="float64", device="cpu", progress=False, sampler="global",
                seed=5, lr=0.01)
    return TrainConfig(**{**base, **overrides})


class Recorder(Callback):
    def __init__(self):
        self.steps, self.epochs = [], []

    def on_step_end(self, record):
        self.steps.append(record)

    def on_epoch_end(self, record):
        self.epochs.append(record)


def test_every_rank_sees_the_same_records(comm, small_classification):
    seen = Recorder()
    result = train(config(data=small_classification, epochs=2), comm, callbacks=[seen])
    assert [r["step"] for r in seen.steps] == list(range(1, result.summary["steps"] + 1))
    assert seen.epochs == result.history
    everyone = comm.allgather((seen.steps, seen.epochs))
    assert all(theirs == everyone[0] for theirs in everyone)


def test_one_ranks_request_stops_every_rank_after_the_same_step(comm, small_classification, shared_dir):
    """Only the last rank's callback asks, at step 7: every rank stops there, writes its final
    checkpoint and save file as a finished run, and reports why."""

    class StopOnLastRank(Callback):
        def on_step_end(self, record):
            return comm.rank == comm.size - 1 and record["step"] == 7

    saved, folder = os.path.join(shared_dir, "m.h5"), os.path.join(shared_dir, "ck")
    result = train(config(data=small_classification, epochs=3, save=saved, checkpoint_dir=folder), comm,
                   callbacks=[StopOnLastRank(), Recorder()])
    everyone = comm.allgather((result.summary["steps"], result.summary["stopped"], len(result.history)))
    assert everyone == [(7, "stopped by a callback", 1)] * comm.size
    assert result.history[0]["step"] == 7 and os.path.exists(saved)
    assert result.summary["written"] == [saved, os.path.join(folder, "ckpt-00000007.h5")]


def test_an_epoch_callback_can_stop_too(comm, small_classification):
    class AfterFirstEpoch:  # any object with the hook will do
        def on_epoch_end(self, record):
            return True

    result = train(config(data=small_classification, epochs=3), comm, callbacks=[AfterFirstEpoch()])
    assert len(result.history) == 1 and result.summary["stopped"] == "stopped by a callback"


def test_a_callback_that_raises_on_one_rank_raises_on_every_rank(comm, small_classification):
    class Fails(Callback):
        def on_epoch_end(self, record):
            if comm.rank == comm.size - 1:
                raise ValueError("boom")

    with pytest.raises(MpitrainError, match="Fails.on_epoch_end raised ValueError: boom"):
        train(config(data=small_classification, epochs=1), comm, callbacks=[Fails()])


def test_bad_callbacks_are_refused_before_any_message(comm, small_classification):
    with pytest.raises(MpitrainError, match="neither on_step_end"):
        train(config(data=small_classification, epochs=1), comm, callbacks=[object()])
    with pytest.raises(MpitrainError, match="--sync ps reports its epochs only at the end"):
        train(config(data=small_classification, epochs=1, sync="ps"), comm, callbacks=[Recorder()])
