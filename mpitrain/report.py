"""What rank 0 shows and writes: the start-up line, the progress bar, one line and one metrics
record per epoch, and the final record. Every rank keeps the history, so every rank returns it.
"""

import json
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from mpitrain.backend import Backend
from mpitrain.config import TrainConfig
from mpitrain.errors import MpitrainError
from mpitrain.outputs import atomic_write


@dataclass
class TrainResult:
    """What a run leaves behind: final parameters (host copies) and one record per epoch."""

    parameters: dict[str, np.ndarray]
    history: list[dict] = field(default_factory=list)


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


class Reporter:
    """Rank 0's progress bar, per-epoch lines and metrics JSONL; other ranks only keep the history."""

    def __init__(self, config: TrainConfig, world: int, steps: int, is_root: bool):
        self.config, self.world, self.steps, self.is_root = config, world, steps, is_root
        self.history: list[dict] = []
        self.bar = None
        self.metrics = None

    def start(self, backend: Backend, threads: int) -> None:
        if not self.is_root:
            return
        if self.config.metrics:
            try:
                # A resumed run continues its metrics file.
                self.metrics = open(self.config.metrics, "a" if self.config.resume else "w")
            except OSError as exc:
                raise MpitrainError(f"--metrics {self.config.metrics}: {exc.strerror}") from None
        self.say(
            f"mpitrain: {self.world} rank(s), {backend.describe()}, {threads} BLAS thread(s) per rank, "
            f"model {self.config.model}, {self.steps} steps of {self.config.batch_size} samples, data {self.config.data}"
        )
        if self.config.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=self.steps, unit="step", dynamic_ncols=True, leave=False)

    def continue_from(self, step: int) -> None:
        """A resumed run's metrics file keeps only the records up to the checkpoint's `step`: the
        epochs an interrupted run wrote after it are run again, and a final record is not final."""
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
        if self.bar is not None:
            self.bar.update(1)

    def write(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

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
        self.write(record)

    def finish(self, result: TrainResult) -> None:
        if not self.is_root:
            return
        if self.bar is not None:
            self.bar.close()
        final = dict(self.history[-1]) if self.history else {"step": 0, "world_size": self.world}
        final["final"] = True
        self.write(final)
        if self.metrics is not None:
            self.metrics.close()
