"""--resume takes the run's settings from its checkpoint, under the command line's; the warning names
exactly what differs. --init-from gives the model when --model is not."""

import dataclasses
import os
import re

import pytest

from mpitrain.cli import make_parser, run, train_config, train_settings
from mpitrain.config import TrainConfig, as_dict
from mpitrain.errors import MpitrainError
from mpitrain.settings import complete


def first_run(data: str, folder: str, *extra: str) -> list[str]:
    return ["train", "--data", data, "--model", "12-16-3", "--batch-size", "18", "--epochs", "2", "--lr", "0.01",
            "--dtype", "float64", "--sampler", "global", "--seed", "5", "--device", "cpu", "--no-progress",
            "--schedule", "cosine", "--checkpoint-dir", folder, *extra]


def test_resume_restores_every_setting_under_the_command_line(comm, small_classification, shared_dir, capsys):
    folder = os.path.join(shared_dir, "ck")
    original = first_run(small_classification, folder)
    run(original)
    resume = ["train", "--checkpoint-dir", folder, "--resume", "auto", "--epochs", "3", "--lr", "0.02",
              "--no-progress"]
    settings = complete(train_settings(make_parser().parse_args(resume)), comm)
    expected = dataclasses.replace(train_config(make_parser().parse_args(original)), epochs=3, lr=0.02,
                                   resume="auto", progress=False)
    assert as_dict(TrainConfig(**settings)) == as_dict(expected)

    capsys.readouterr()
    run(resume)
    err = capsys.readouterr().err
    if comm.rank == 0:
        warning = re.search(r"resuming with (.*): ", err)
        assert warning, err
        assert sorted(warning.group(1).split(", ")) == ["epochs 2 -> 3", "lr 0.01 -> 0.02"]


def test_resume_auto_without_a_checkpoint_keeps_the_command_line(comm, shared_dir):
    folder = os.path.join(shared_dir, "empty")
    given = {"checkpoint_dir": folder, "resume": "auto", "epochs": 7}
    assert complete(given, comm) == given
    with pytest.raises(MpitrainError, match="--resume auto needs --checkpoint-dir"):
        run(["train", "--resume", "auto"])


def test_init_from_gives_the_model(comm, small_classification, shared_dir):
    saved = os.path.join(shared_dir, "m.h5")
    run(["train", "--data", small_classification, "--model", "12-16-3", "--activation", "tanh", "--steps", "2",
         "--device", "cpu", "--no-progress", "--save", saved])
    settings = complete({"init_from": saved, "data": small_classification}, comm)
    assert (settings["model"], settings["activation"]) == ("12-16-3", "tanh")
    assert complete({"init_from": saved, "model": "12-8-3"}, comm)["model"] == "12-8-3"
    run(["train", "--data", small_classification, "--init-from", saved, "--steps", "1", "--device", "cpu",
         "--no-progress"])  # the default 784-wide model would not fit 12 features


def test_init_from_a_file_without_a_model_is_one_line(comm, small_classification):
    with pytest.raises(MpitrainError, match="--init-from .*small.h5: the file does not say its model; give --model"):
        complete({"init_from": small_classification}, comm)


def test_resume_auto_takes_the_settings_of_the_checkpoint_it_resumes_from(comm, small_classification, shared_dir):
    """A damaged newest checkpoint is skipped by the resume; its settings must be skipped with it
    (they were taken while the run resumed from the file before it)."""
    import h5py

    from mpitrain.checkpoint import list_checkpoints

    folder = os.path.join(shared_dir, "ck-damaged")
    run(first_run(small_classification, folder, "--epochs", "1"))
    run(["train", "--checkpoint-dir", folder, "--resume", "auto", "--epochs", "2", "--lr", "0.02", "--no-progress"])
    newest = list_checkpoints(folder)[-1][1]
    if comm.rank == 0:
        with h5py.File(newest, "r") as handle:
            offset = handle["model/0/weight"].id.get_offset()
        with open(newest, "r+b") as raw:  # one flipped bit: the digest no longer checks out
            raw.seek(offset + 5)
            byte = raw.read(1)
            raw.seek(offset + 5)
            raw.write(bytes([byte[0] ^ 0x01]))
    comm.Barrier()
    resume = ["train", "--checkpoint-dir", folder, "--resume", "auto", "--no-progress"]
    settings = complete(train_settings(make_parser().parse_args(resume)), comm)
    assert settings["lr"] == 0.01 and settings["epochs"] == 1  # the older checkpoint's run
