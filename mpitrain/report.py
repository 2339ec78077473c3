"""What rank 0 shows and writes: the start-up line, the progress bar, one line and one metrics
record per epoch, step records every --log-every steps, the end-of-run summary (a line and the
final record), and the same scalars as TensorBoard events with --tensorboard. Every rank keeps the
history, so every rank returns it.
"""

import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from mpitrain.backend import Backend
from mpitrain.config import TrainConfig
from mpitrain.errors import MpitrainError
from mpitrain.outputs import atomic_write


@dataclass
class TrainResult:
    """What a run leaves behind: final parameters (host copies), one record per epoch, and the
    summary (the final metrics record)."""

    parameters: dict[str, np.ndarray]
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def busiest_rank(comm: MPI.Intracomm, traffic: np.ndarray, wait: float, memory: np.ndarray) -> dict:
    """Per-step bytes sent and per-rank memory of the busiest rank (MAX over ranks), in the record
    fields of every layout: traffic is (tp, pp, dp) bytes per step, memory (params, grads, optimizer
    state, activations) bytes. What bounds a layout is its most loaded rank. Collective on comm."""
    mine = np.concatenate([traffic, [traffic.sum(), wait], memory])
    worst = np.empty_like(mine)
    comm.Allreduce(mine, worst, op=MPI.MAX)
    tp, pp, dp, total, wait, params, grads, optimizer, activations = worst.tolist()
    return {"tp_bytes_per_step": int(tp), "pp_bytes_per_step": int(pp), "dp_bytes_per_step": int(dp),
            "sent_bytes_per_step": int(total), "pipeline_wait_fraction": wait,
            "param_bytes_per_rank": int(params), "grad_bytes_per_rank": int(grads),
            "optimizer_bytes_per_rank": int(optimizer), "activation_bytes_per_rank": int(activations)}


def validation_metrics(totals: np.ndarray, config: TrainConfig) -> dict:
    """{val_loss, val_accuracy} from all ranks' summed (loss, correct, rows); {} without rows."""
    if totals[2] == 0:
        return {}
    result = {"val_loss": totals[0] / totals[2]}
    if config.loss == "ce":
        result["val_accuracy"] = totals[1] / totals[2]
    return result


def _kept(line: bytes, step: int) -> bool:
    """Whether a metrics line stays when a run resumes at `step` (a line that is not a record stays)."""
    try:
        record = json.loads(line)
    except ValueError:
        return True
    if not isinstance(record, dict):
        return True
    saved = record.get("step")
    return not (isinstance(saved, (int, float)) and saved > step) and not record.get("final")


# Scalars of the records that TensorBoard shows, each against the step.
SCALARS = {"step": ("loss", "lr", "step_time_s", "samples_per_s"),
           "epoch": ("loss", "val_loss", "val_accuracy", "lr", "samples_per_s")}


# Processes of MPI launchers between a rank and the user's terminal (names as /proc/PID/comm shows them).
LAUNCHERS = ("hydra_pmi_proxy", "mpiexec", "mpirun", "mpiexec.hydra", "orted", "prted", "prterun", "slurmstepd")


def shows_progress(config: TrainConfig, stream=None, proc: str = "/proc") -> bool:
    """--progress / --no-progress, else a bar only when stderr is a terminal (not in batch logs)."""
    if config.progress is not None:
        return config.progress
    stream = sys.stderr if stream is None else stream
    if getattr(stream, "isatty", lambda: False)():
        return True
    return stream is sys.stderr and launcher_has_terminal(os.getpid(), proc)


def launcher_has_terminal(pid: int, proc: str = "/proc") -> bool:
    """Whether the launcher above this process writes to a terminal. Under mpirun a rank's stderr is
    a pipe to the launcher, which forwards it to its own: the outermost launcher process's stderr
    is what the user sees (a terminal, or the file of a batch log). Linux /proc; False elsewhere."""
    decided = None
    try:
        for _ in range(8):
            with open(os.path.join(proc, str(pid), "stat")) as handle:
                pid = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open(os.path.join(proc, str(pid), "comm")) as handle:
                if handle.read().strip() not in LAUNCHERS:
                    break
            decided = os.readlink(os.path.join(proc, str(pid), "fd", "2"))
    except (OSError, ValueError, IndexError):
        return False
    return decided is not None and decided.startswith(("/dev/pts/", "/dev/tty"))


def open_tensorboard(folder: str):
    """A tensorboardX SummaryWriter on `folder`; MpitrainError when the extra is missing or the folder
    cannot be made."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise MpitrainError("--tensorboard needs the tensorboard extra: pip install 'mpitrain[tensorboard]' "
                            "(tensorboardX)") from None
    try:
        os.makedirs(folder, exist_ok=True)
        return SummaryWriter(folder)
    except OSError as exc:
        raise MpitrainError(f"--tensorboard {folder}: {exc.strerror or exc}") from None


class Reporter:
    """Rank 0's progress bar, lines, metrics JSONL and TensorBoard events; other ranks only keep the history."""

    def __init__(self, config: TrainConfig, world: int, steps: int, is_root: bool):
        self.config, self.world, self.steps, self.is_root = config, world, steps, is_root
        self.history: list[dict] = []
        self.bar = None
        self.metrics = None
        self.events = None

    def start(self, backend: Backend, threads: int, allreduce: str | None = None) -> None:
        """Open the outputs and print the start-up line; `allreduce` says which gradient sum runs
        (with --allreduce auto, whose thresholds)."""
        if not self.is_root:
            return
        if self.config.metrics:
            try:
                # A resumed run continues its metrics file.
                self.metrics = open(self.config.metrics, "a" if self.config.resume else "w")
            except OSError as exc:
                raise MpitrainError(f"--metrics {self.config.metrics}: {exc.strerror}") from None
        if self.config.tensorboard:
            self.events = open_tensorboard(self.config.tensorboard)
        sums = f", all-reduce {allreduce}" if allreduce else ""
        self.say(
            f"mpitrain: {self.world} rank(s), {backend.describe()}, {threads} BLAS thread(s) per rank, "
            f"model {self.config.model}, {self.steps} steps of {self.config.batch_size} samples, "
            f"data {self.config.data}{sums}"
        )
        if shows_progress(self.config):
            from tqdm import tqdm

            self.bar = tqdm(total=self.steps, unit="step", dynamic_ncols=True, leave=False)

    def continue_from(self, step: int) -> None:
        """A resumed run's bar starts at `step`, and its metrics file keeps only the records up to
        that step: the epochs an interrupted run wrote after it are run again, and a final record
        is not final."""
        if self.bar is not None and step:
            self.bar.update(step)
        if self.metrics is None or not self.config.resume:
            return
        self.metrics.close()
        try:
            with open(self.config.metrics, "rb") as handle:
                lines = handle.read().splitlines(keepends=True)
        except OSError as exc:
            raise MpitrainError(f"--metrics {self.config.metrics}: {exc.strerror}") from None
        kept = [line for line in lines if _kept(line, step)]
        if len(kept) != len(lines):
            atomic_write(self.config.metrics, lambda out: out.writelines(kept), binary=True)
        self.metrics = open(self.config.metrics, "a")

    def say(self, line: str) -> None:
        """Print a line on rank 0 (above the progress bar); other ranks say nothing."""
        if not self.is_root:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def advance(self) -> None:
        """One step more on the bar, never past its total: an asynchronous parameter-server worker
        (rank 0 stands for all) may push more than its share of the steps."""
        if self.bar is not None and self.bar.n < self.bar.total:
            self.bar.update(1)

    def write(self, record: dict, kind: str | None = None) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        if self.events is not None and kind is not None:
            for name in SCALARS[kind]:
                if isinstance(record.get(name), (int, float)):
                    self.events.add_scalar(f"{kind}/{name}", record[name], record["step"])
            self.events.flush()

    def _postfix(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {record['loss']:.4g}, {record['samples_per_s']:.0f} samples/s")

    def step(self, record: dict) -> None:
        """A --log-every step record: metrics file, TensorBoard and the bar's postfix."""
        if self.is_root:
            self.write(record, "step")
            self._postfix(record)

    def epoch(self, record: dict) -> None:
        self.history.append(record)
        if not self.is_root:
            return
        accuracy = f", val_accuracy {record['val_accuracy']:.4f}" if "val_accuracy" in record else ""
        val = f", val_loss {record['val_loss']:.4f}" if "val_loss" in record else ""
        self.say(
            f"epoch {record['epoch']} step {record['step']}: loss {record['loss']:.4f}{val}{accuracy}, "
            f"{record['samples_per_s']:.0f} samples/s"
        )
        self.write(record, "epoch")
        self._postfix(record)

    def finish(self, summary: dict) -> None:
        """The bar filled to the last step, the summary record and line; outputs closed."""
        if not self.is_root:
            return
        if self.bar is not None:
            self.bar.update(max(summary["steps"] - self.bar.n, 0))
            self.bar.close()
        self.write(summary)
        self.say(summary_line(summary))
        if self.metrics is not None:
            self.metrics.close()
        if self.events is not None:
            self.events.close()


# ---------------------------------------------------------------------------- the end of a run

# Fields of an epoch record measured over that epoch: the summary reports them as final_* or not at all.
PER_EPOCH = ("epoch", "step", "loss", "val_loss", "val_accuracy", "lr", "samples_per_s", "elapsed_s",
             "pipeline_wait_fraction")


def summarize(config: TrainConfig, history: list[dict], steps: int, first_step: int, train_seconds: float,
              elapsed: float, best: dict | None, stopped: str | None, written: list[str], world: int) -> dict:
    """The final metrics record: totals of the run (this process's steps from first_step on, their
    mean samples/s over train_seconds), the last epoch's figures as final_*, the best validation
    epoch as best_*, why it stopped early (None: it ran all its steps), the files it wrote, and the
    fields of the last record that describe the whole run (layout, bytes, memory, server counts)."""
    last = history[-1] if history else {}
    summary = {name: value for name, value in last.items() if name not in PER_EPOCH}
    summary.update({"final": True, "step": steps, "steps": steps, "epochs": last.get("epoch", 0),
               "elapsed_s": elapsed, "train_seconds": train_seconds,
               "samples_per_s": (steps - first_step) * config.batch_size / train_seconds if train_seconds > 0 else 0.0,
               "world_size": world, "stopped": stopped, "written": written})
    for name in ("loss", "val_loss", "val_accuracy"):
        if name in last:
            summary[f"final_{name}"] = last[name]
    if "lr" in last:
        summary["lr"] = last["lr"]  # the rate of the last step, as in every record
    if best:
        summary.update({f"best_{name}": value for name, value in best.items()})
    return summary


def written_files(config: TrainConfig, checkpoint: str | None, best_written: bool) -> list[str]:
    """What a finished run leaves on disk, in the order the summary line names them."""
    paths = [config.save, config.save_best if best_written else None, checkpoint, config.metrics, config.tensorboard]
    return [path for path in paths if path]


def summary_line(summary: dict) -> str:
    """'done: 300 steps in 12.3 s, 25000 samples/s; val_loss 0.1234, val_accuracy 0.9650; best
    val_loss 0.1200 (val_accuracy 0.9700) at step 280; wrote m.h5, run.jsonl'."""
    stopped = f" ({summary['stopped']})" if summary["stopped"] else ""
    parts = [f"mpitrain: done{stopped}: {summary['steps']} steps in {summary['elapsed_s']:.1f} s, "
             f"{summary['samples_per_s']:.0f} samples/s"]
    final = [f"{name} {summary['final_' + name]:.4f}" for name in ("loss", "val_loss", "val_accuracy")
             if "final_" + name in summary]
    if final:
        parts.append("final " + ", ".join(final))
    if "best_val_loss" in summary:
        accuracy = f" (val_accuracy {summary['best_val_accuracy']:.4f})" if "best_val_accuracy" in summary else ""
        parts.append(f"best val_loss {summary['best_val_loss']:.4f}{accuracy} at step {summary['best_step']}")
    if summary["written"]:
        parts.append("wrote " + ", ".join(summary["written"]))
    else:
        parts.append("nothing saved (no --save, --checkpoint-dir or --metrics)")
    return "; ".join(parts)
