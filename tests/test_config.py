"""TrainConfig validates on construction: every value the command line refuses, Python refuses with
the same message, because both go through config.validate."""

import dataclasses

import pytest

from mpitrain import MpitrainError, TrainConfig
from mpitrain.cli import make_parser, train_config

# (flags, what the message names): values that parse as their type but are out of range or not allowed.
REFUSED = [
    (["--optimizer", "rmsprop"], "--optimizer 'rmsprop'"),
    (["--schedule", "exponential"], "--schedule 'exponential'"),
    (["--lr", "-1"], "--lr -1.0"),
    (["--lr", "nan"], "--lr nan"),
    (["--momentum", "1"], "--momentum 1.0"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--epochs", "0"], "--epochs 0"),
    (["--seed", "-3"], "--seed -3"),
    (["--val-fraction", "1"], "--val-fraction 1.0"),
    (["--model", "784-x-10"], "--model '784-x-10'"),
    (["--trace-steps", "5:2"], "--trace-steps '5:2'"),
    (["--max-memory", "lots"], "lots"),
    (["--lr-decay", "1.5"], "--lr-decay 1.5"),
    (["--min-lr", "0.5"], "--min-lr 0.5"),
    (["--lr-patience", "0"], "--lr-patience 0"),
    (["--early-stop", "0"], "--early-stop 0"),
    (["--log-every", "0"], "--log-every 0"),
    (["--early-stop", "3", "--sync", "ps"], "--early-stop"),
    (["--log-every", "5", "--sync", "ps"], "--log-every"),
    (["--save-best", "b.h5", "--val-fraction", "0"], "--save-best"),
    (["--checkpoint-every", "5"], "--checkpoint-every needs --checkpoint-dir"),
    (["--partition", "stratified", "--loss", "mse"], "--partition stratified"),
]


@pytest.mark.parametrize("flags,names", REFUSED, ids=[" ".join(flags) for flags, _ in REFUSED])
def test_python_refuses_what_the_command_line_refuses_with_the_same_message(flags, names):
    args = make_parser().parse_args(["train", *flags])
    with pytest.raises(MpitrainError) as from_cli:
        train_config(args)
    given = {name: value for name, value in vars(args).items() if value is not None and name != "command"}
    with pytest.raises(MpitrainError) as from_python:
        TrainConfig(**given)
    assert str(from_python.value) == str(from_cli.value)
    assert names in str(from_cli.value)


def test_a_changed_config_is_validated_again_by_train():
    """A dataclass can be changed after it was built: train() checks it again before any message."""
    from mpitrain import train

    config = TrainConfig(model="8-4-3", device="cpu", progress=False, steps=1)
    config.lr = -1.0
    with pytest.raises(MpitrainError, match="--lr -1.0"):
        train(config)


def test_wrong_types_are_named():
    with pytest.raises(MpitrainError, match="TrainConfig: epochs = 2.5 is not an int"):
        TrainConfig(epochs=2.5)
    with pytest.raises(MpitrainError, match="TrainConfig: progress = 'yes' is not a bool"):
        TrainConfig(progress="yes")
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)


def test_replace_validates_too():
    with pytest.raises(MpitrainError, match="--batch-size 0"):
        dataclasses.replace(TrainConfig(), batch_size=0)
