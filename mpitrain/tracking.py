"""What a run keeps watching across epochs: the best validation loss, the plateau of
`--schedule plateau`, the patience of `--early-stop`, and the wall time already spent.

    tracker = Tracker(config)
    lr = schedule(..., **tracker.schedule_options(steps_per_epoch))   # optim.schedule, plateau scale included
    improved, stop = tracker.observe(record)                          # after each epoch's validation

`observe` sees the same record on every rank (the loop broadcasts rank 0's), so every rank reaches
the same decision without another message. The state is a small JSON object in every checkpoint
(resilience.py), so a resumed run continues the schedule, the patience and the best figure exactly.
"""

import math

from mpitrain.config import TrainConfig
from mpitrain.errors import MpitrainError

BEST_FIELDS = ("epoch", "step", "val_loss", "val_accuracy")


class Tracker:
    """Best validation figures, plateau decay and early-stopping patience of one run."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.best: dict | None = None   # BEST_FIELDS of the epoch with the lowest validation loss
        self.lr_scale = 1.0             # --schedule plateau: product of the decays applied so far
        self.plateau_epochs = 0         # epochs without improvement since the last decay or improvement
        self.stale_epochs = 0           # epochs since the best one (--early-stop)
        self.elapsed_before = 0.0       # seconds the run spent before the checkpoint it resumed from
        self.stopped: str | None = None  # why --early-stop ended the run: a resumed run stays ended

    def schedule_options(self, steps_per_epoch: int) -> dict:
        """The keyword arguments of optim.schedule beyond the flags' kind, rate and warm-up."""
        config = self.config
        return {"min_lr": config.min_lr, "decay": config.lr_decay, "steps_per_epoch": steps_per_epoch,
                "scale": self.lr_scale}

    def observe(self, record: dict) -> tuple[bool, bool]:
        """(improved, stop) after an epoch: whether its validation loss is the lowest so far (strictly),
        and whether --early-stop's patience ran out. An epoch without validation changes nothing."""
        loss = record.get("val_loss")
        if loss is None:
            return False, False
        improved = math.isfinite(loss) and (self.best is None or loss < self.best["val_loss"])
        if improved:
            self.best = {key: record[key] for key in BEST_FIELDS if key in record}
            self.stale_epochs = self.plateau_epochs = 0
        else:
            self.stale_epochs += 1
            self.plateau_epochs += 1
            if self.config.schedule == "plateau" and self.plateau_epochs >= self.config.lr_patience:
                self.lr_scale *= self.config.lr_decay
                self.plateau_epochs = 0
        stop = self.config.early_stop is not None and self.stale_epochs >= self.config.early_stop
        return improved, stop

    # ------------------------------------------------------------------------ checkpoint

    def state(self, elapsed: float) -> dict:
        return {"best": self.best, "lr_scale": self.lr_scale, "plateau_epochs": self.plateau_epochs,
                "stale_epochs": self.stale_epochs, "elapsed_s": elapsed, "stopped": self.stopped}

    def load_state(self, state, path: str) -> None:
        """Restore state(); a checkpoint written before it existed (None) leaves the defaults. Every
        field is checked: checkpoint metadata is never trusted."""
        if state is None:
            return
        def bad(name):
            return MpitrainError(f"{path}: checkpoint field 'tracking/{name}' is missing or out of range")
        if not isinstance(state, dict):
            raise bad("")
        best = state.get("best")
        if best is not None and not (isinstance(best, dict) and set(best) <= set(BEST_FIELDS)
                                     and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                             for v in best.values()) and "val_loss" in best):
            raise bad("best")
        numbers = {}
        for name, kind, low in (("lr_scale", float, 0.0), ("plateau_epochs", int, 0), ("stale_epochs", int, 0),
                                ("elapsed_s", float, 0.0)):
            value = state.get(name)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool) or not math.isfinite(value) or value < low:
                raise bad(name)
            numbers[name] = value
        if numbers["lr_scale"] > 1:
            raise bad("lr_scale")
        stopped = state.get("stopped")
        if stopped is not None and not isinstance(stopped, str):
            raise bad("stopped")
        # Stopped by a patience this run no longer has (--early-stop raised or dropped): go on.
        patience = self.config.early_stop
        self.stopped = stopped if patience is not None and numbers["stale_epochs"] >= patience else None
        self.best = best
        self.lr_scale, self.plateau_epochs = numbers["lr_scale"], numbers["plateau_epochs"]
        self.stale_epochs, self.elapsed_before = numbers["stale_epochs"], numbers["elapsed_s"]
