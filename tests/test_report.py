"""What a run reports: step and epoch records, the end-of-run summary (record and line), the start-up
line, TensorBoard events read back by TensorBoard's own reader, and the progress bar."""

import io
import json
import os

import pytest

from mpitrain.config import TrainConfig
from mpitrain.report import summary_line
from mpitrain.train import train

STEP_FIELDS = {"step", "loss", "lr", "step_time_s", "samples_per_s", "elapsed_s"}


def config(**overrides) -> TrainConfig:
    base = dict(model="12-16-3", batch_size=18, dtype="float64", device="cpu", progress=False, sampler="global",
                seed=5, lr=0.01, schedule="linear", min_lr=0.001)
    return TrainConfig(**{**base, **overrides})


def records_on_root(comm, path: str) -> list[dict]:
    comm.Barrier()
    return comm.bcast([json.loads(line) for line in open(path)] if comm.rank == 0 else None)


def test_step_and_epoch_records_and_the_summary(comm, small_classification, shared_dir, capsys):
    """--log-every 5 over 2 epochs of 24 steps: step records at 5, 10, ..., each with its fields and the
    scheduled rate; epoch records with lr and elapsed_s; a final summary whose totals and best are
    those of the epoch records; and a summary line on rank 0 naming what was written."""
    metrics, saved = os.path.join(shared_dir, "run.jsonl"), os.path.join(shared_dir, "m.h5")
    settings = config(data=small_classification, epochs=2, log_every=5, metrics=metrics, save=saved)
    result = train(settings, comm)
    records = records_on_root(comm, metrics)
    steps = [r for r in records if "epoch" not in r and not r.get("final")]
    epochs = [r for r in records if "epoch" in r]
    summary = records[-1]
    total = epochs[-1]["step"]
    assert [r["step"] for r in steps] == list(range(5, total + 1, 5))
    for record in steps:
        assert set(record) == STEP_FIELDS, record
        assert record["lr"] == pytest.approx(0.01 + (0.001 - 0.01) * (record["step"] - 1) / total)
    for record in epochs:
        assert {"lr", "elapsed_s", "val_loss", "val_accuracy"} <= set(record)
    assert all("lr" in record and "elapsed_s" in record for record in records)
    assert [r["elapsed_s"] for r in epochs] == sorted(r["elapsed_s"] for r in epochs)
    best = min(epochs, key=lambda r: r["val_loss"])
    assert summary["final"] is True and summary["steps"] == total and summary["epochs"] == len(epochs)
    assert (summary["best_val_loss"], summary["best_step"]) == (best["val_loss"], best["step"])
    assert summary["final_val_accuracy"] == epochs[-1]["val_accuracy"]
    assert summary["written"] == [saved, metrics] and summary["stopped"] is None
    assert summary["elapsed_s"] >= summary["train_seconds"] > 0
    assert result.summary == summary and result.history == epochs
    out = capsys.readouterr().out
    if comm.rank == 0:
        assert summary_line(summary) in out
        assert f"{total} steps" in summary_line(summary) and f"wrote {saved}, {metrics}" in summary_line(summary)
        assert f"at step {best['step']}" in summary_line(summary)
    else:
        assert out == ""


def test_summary_says_when_nothing_was_saved(comm, small_classification):
    summary = train(config(data=small_classification, steps=3), comm).summary
    line = summary_line(summary)
    assert summary["written"] == [] and "nothing saved" in line and line.startswith("mpitrain: done: 3 steps")


def test_start_up_line_names_the_all_reduce_thresholds(comm, small_classification, shared_dir, monkeypatch, capsys):
    """With --allreduce auto the start-up line says whose thresholds choose: a tuning file's path
    when it has this layout, the built-in ones otherwise."""
    from mpitrain.comm.hier import node_group
    from mpitrain.comm.thresholds import ENV_FILE

    nodes = node_group(comm).nodes  # collective: on every rank
    tune_file = os.path.join(shared_dir, "tune.json")
    monkeypatch.setenv(ENV_FILE, tune_file)
    train(config(data=small_classification, steps=1), comm)
    built_in = capsys.readouterr().out
    if comm.rank == 0:
        key = f"p{comm.size}-n{nodes}"
        with open(tune_file, "w") as handle:
            json.dump({"format": 1, "layouts": {key: {"thresholds": [[None, "ring"]]}}}, handle)
    comm.Barrier()
    train(config(data=small_classification, steps=1), comm)
    tuned = capsys.readouterr().out
    # A file from before the halves of --zero were tuned: their thresholds stay the built-in ones.
    train(config(data=small_classification, steps=1, zero=1), comm)
    sharded = capsys.readouterr().out
    if comm.rank == 0 and comm.size > 1:
        assert "all-reduce auto, built-in thresholds" in built_in and tune_file in built_in
        assert f"all-reduce auto, tuned thresholds from {tune_file}" in tuned
        assert f"all-reduce auto, built-in thresholds for {key} ({tune_file} tunes its all-reduce only" in sharded
    elif comm.rank == 0:
        assert "all-reduce" not in built_in  # one rank sums nothing


def test_tensorboard_events_hold_the_records_scalars(comm, small_classification, shared_dir):
    pytest.importorskip("tensorboardX", reason="the tensorboard extra is not installed")
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                      reason="tensorboard (its reader) is not installed")
    folder, metrics = os.path.join(shared_dir, "tb"), os.path.join(shared_dir, "run.jsonl")
    train(config(data=small_classification, epochs=2, log_every=8, metrics=metrics, tensorboard=folder), comm)
    records = records_on_root(comm, metrics)
    if comm.rank != 0:
        return
    events = accumulator.EventAccumulator(folder)
    events.Reload()
    for kind, names in (("step", ("loss", "lr", "samples_per_s")), ("epoch", ("loss", "val_loss", "val_accuracy"))):
        chosen = [r for r in records if ("epoch" in r) == (kind == "epoch") and not r.get("final")]
        for name in names:
            scalars = events.Scalars(f"{kind}/{name}")
            assert [s.step for s in scalars] == [r["step"] for r in chosen]
            assert [s.value for s in scalars] == pytest.approx([r[name] for r in chosen], rel=1e-6)


def test_missing_tensorboard_extra_is_one_line(comm, small_classification, shared_dir, monkeypatch):
    import builtins

    from mpitrain.errors import MpitrainError

    real_import = builtins.__import__

    def without_tensorboardx(name, *args, **kwargs):
        if name == "tensorboardX":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_tensorboardx)
    with pytest.raises(MpitrainError, match=r"--tensorboard needs the tensorboard extra: pip install 'mpitrain\[tensorboard\]'"):
        train(config(data=small_classification, steps=1, tensorboard=os.path.join(shared_dir, "tb")), comm)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bar_only_on_a_terminal_unless_forced():
    from mpitrain.report import shows_progress

    assert shows_progress(TrainConfig(), _Terminal()) and not shows_progress(TrainConfig(), io.StringIO())
    assert shows_progress(TrainConfig(progress=True), io.StringIO())
    assert not shows_progress(TrainConfig(progress=False), _Terminal())


@pytest.mark.parametrize("layout", [{}, {"sync": "ps", "ps_mode": "async"}], ids=["grid", "parameter server"])
def test_bar_reaches_the_last_step_with_loss_and_rate(comm, small_classification, monkeypatch, layout):
    """In every layout the bar ends at the run's last step (the parameter server's rank 0 pushes
    only its share) and its postfix shows loss and samples/s."""
    import tqdm

    if layout.get("sync") == "ps" and comm.size == 1:
        pytest.skip("the parameter server needs a worker and a server")
    closed = []

    class Bar(tqdm.tqdm):
        def close(self):
            closed.append((self.n, self.total, self.postfix))
            super().close()

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    result = train(config(data=small_classification, epochs=2, progress=True, **layout), comm)
    summary = result.summary
    assert all("lr" in record and "elapsed_s" in record for record in [*result.history, summary])
    if comm.rank == 0:
        n, total, postfix = closed[0]  # tqdm closes again when it is collected
        assert n == total == summary["steps"]
        assert "loss" in postfix and "samples/s" in postfix
    else:
        assert closed == []


def test_summary_line_from_a_derived_record():
    record = {"final": True, "steps": 40, "elapsed_s": 2.0, "samples_per_s": 1234.4, "stopped": "early stop",
              "written": [], "final_val_loss": 0.5, "best_val_loss": 0.25, "best_step": 30, "best_val_accuracy": 0.75}
    line = summary_line(record)
    assert line.startswith("mpitrain: done (early stop): 40 steps in 2.0 s, 1234 samples/s")
    assert "final val_loss 0.5000" in line and "best val_loss 0.2500 (val_accuracy 0.7500) at step 30" in line


def fake_proc(root, chain: list[tuple[str, str]]) -> int:
    """A /proc of processes, each the parent of the next: (comm, where fd 2 points); returns the
    last one's pid."""
    for pid, (name, stderr) in enumerate(chain, start=10):
        folder = root / str(pid)
        (folder / "fd").mkdir(parents=True)
        (folder / "stat").write_text(f"{pid} ({name}) S {pid - 1} 0 0")
        (folder / "comm").write_text(name + "\n")
        os.symlink(stderr, folder / "fd" / "2")
    return 10 + len(chain) - 1


@pytest.mark.parametrize("launcher_stderr,shown", [("/dev/pts/3", True), ("/scratch/job-17.log", False)])
def test_under_mpirun_the_launchers_stderr_decides(tmp_path, launcher_stderr, shown):
    """A rank's stderr is a pipe to hydra's proxy; mpirun's own stderr is what the user sees. A shell
    above mpirun does not count: its terminal may not be where mpirun writes."""
    from mpitrain.report import launcher_has_terminal

    rank = fake_proc(tmp_path, [("bash", "/dev/pts/3"), ("mpirun", launcher_stderr),
                                ("hydra_pmi_proxy", "pipe:[7]"), ("python", "pipe:[8]")])
    assert launcher_has_terminal(rank, str(tmp_path)) is shown
    alone = fake_proc(tmp_path / "alone", [("bash", "/dev/pts/3"), ("python", "pipe:[9]")])
    assert launcher_has_terminal(alone, str(tmp_path / "alone")) is False  # piped into a pager, say
