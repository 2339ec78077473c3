"""`mpitrain plot` draws --metrics files: checked on matplotlib's own figure objects, not on pixels."""

import builtins
import json
import os

import pytest

from mpitrain import plot
from mpitrain.cli import run
from mpitrain.errors import MpitrainError


def write_run(path: str, scale: float, steps: int = 12, per_epoch: int = 4) -> list[dict]:
    """A --metrics file: a step record every step, an epoch record every per_epoch steps, a summary."""
    records = []
    for step in range(1, steps + 1):
        records.append({"step": step, "loss": scale / step, "lr": 0.1 / step, "step_time_s": 0.01,
                        "samples_per_s": 100.0 * step, "elapsed_s": 0.01 * step})
        if step % per_epoch == 0:
            records.append({"epoch": step // per_epoch, "step": step, "loss": scale / step, "lr": 0.1 / step,
                            "samples_per_s": 100.0, "val_loss": 2 * scale / step, "val_accuracy": 1 - 1 / step})
    records.append({"final": True, "step": steps, "steps": steps})
    with open(path, "w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
    return records


def test_figure_has_the_four_panels_and_every_run(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    paths = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    runs = [write_run(path, scale) for path, scale in zip(paths, (1.0, 3.0))]
    fig = plot.figure(paths)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == [title for _, title in plot.PANELS]
    loss, accuracy, rate, lr = axes
    steps = [r for r in runs[0] if "epoch" not in r and not r.get("final")]
    epochs = [r for r in runs[0] if "epoch" in r]
    # Each run: a loss line over its step records and a validation-loss line over its epochs.
    assert len(loss.lines) == 2 * len(paths)
    assert list(loss.lines[0].get_xdata()) == [r["step"] for r in steps]
    assert list(loss.lines[1].get_ydata()) == [r["val_loss"] for r in epochs]
    assert list(accuracy.lines[1].get_ydata()) == [r["val_accuracy"] for r in runs[1] if "epoch" in r]
    assert [len(ax.lines) for ax in (accuracy, rate, lr)] == [len(paths)] * 3
    assert loss.get_yscale() == "log" and lr.get_yscale() == "log"  # both span more than a factor of 10
    assert rate.get_yscale() == "linear"
    labels = [text.get_text() for text in loss.get_legend().get_texts()]
    assert labels == ["a.jsonl loss", "a.jsonl val_loss", "b.jsonl loss", "b.jsonl val_loss"]
    assert loss.lines[0].get_color() != loss.lines[2].get_color()


def test_command_writes_a_png(comm, shared_dir):
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    source, out = os.path.join(shared_dir, "run.jsonl"), os.path.join(shared_dir, "run.png")
    if comm.rank == 0:
        write_run(source, 1.0)
    comm.Barrier()
    run(["plot", source, "--out", out])
    with open(out, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def without_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_matplotlib)
    with pytest.raises(MpitrainError, match=r"needs the plot extra: pip install 'mpitrain\[plot\]'"):
        plot.figure([str(tmp_path / "a.jsonl")])


def test_bad_metrics_files_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 1.0}\nnot json\n')
    with pytest.raises(MpitrainError, match="bad.jsonl: line 2 is not JSON"):
        plot.read_records(str(bad))
    with pytest.raises(MpitrainError, match="nope.jsonl: file not found"):
        plot.read_records(str(tmp_path / "nope.jsonl"))
