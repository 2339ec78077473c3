"""Callbacks of the Python API: `train(config, callbacks=[...])` calls them on every rank.

    class StopBelow(mpitrain.Callback):
        def on_epoch_end(self, record):
            return record["val_loss"] < 0.05     # True asks the run to stop

A callback defines on_step_end(record), on_epoch_end(record) or both (Callback gives no-op
defaults). Every rank calls them with the same record, after the step or the epoch's validation.
Returning True asks to stop; the ranks then vote in one small collective, so if any rank's callback
asked, every rank stops after that same step, writes its final checkpoint and save file as a
finished run would, and returns. A callback that raises on one rank makes every rank raise
MpitrainError naming it, instead of leaving the others waiting in the next collective.
"""

from mpi4py import MPI

from mpitrain.errors import MpitrainError

HOOKS = ("on_step_end", "on_epoch_end")


class Callback:
    """A callback that does nothing; subclass it and define the hooks you need."""

    def on_step_end(self, record: dict) -> bool | None:
        """After every optimizer step: a step record (see the README's metrics fields)."""
        return None

    def on_epoch_end(self, record: dict) -> bool | None:
        """After each epoch's validation: the epoch record."""
        return None


class Callbacks:
    """The callbacks of one run, checked before any rank communicates."""

    def __init__(self, callbacks):
        self.callbacks = list(callbacks or ())
        for callback in self.callbacks:
            if not any(callable(getattr(callback, hook, None)) for hook in HOOKS):
                raise MpitrainError(f"callback {callback!r} has neither on_step_end(record) nor on_epoch_end(record)")
        self.per_step = any(self._defines(callback, "on_step_end") for callback in self.callbacks)
        self.per_epoch = any(self._defines(callback, "on_epoch_end") for callback in self.callbacks)

    @staticmethod
    def _defines(callback, hook: str) -> bool:
        """Whether the hook does something: Callback's own no-op needs no collective vote."""
        method = getattr(callback, hook, None)
        return callable(method) and getattr(method, "__func__", None) is not getattr(Callback, hook)

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def call(self, hook: str, record: dict, comm: MPI.Intracomm) -> bool:
        """Run every callback's `hook` on `record` (each one, even after one asked to stop); True on
        every rank if any rank's callback asked to stop. Collective on comm when any callback defines
        `hook`; raises MpitrainError on every rank if one raised anywhere."""
        if not (self.per_step if hook == "on_step_end" else self.per_epoch):
            return False
        wish, error = False, None
        for callback in self.callbacks:
            if not self._defines(callback, hook):
                continue
            try:
                wish = bool(getattr(callback, hook)(record)) or wish
            except Exception as exc:  # noqa: BLE001 - reported on every rank below, so none hangs
                error = error or f"{type(callback).__name__}.{hook} raised {type(exc).__name__}: {exc}"
        votes = comm.allgather((error, wish))
        failed = [(rank, text) for rank, (text, _) in enumerate(votes) if text]
        if failed:
            rank, text = failed[0]
            raise MpitrainError(text if comm.size == 1 else f"rank {rank}: {text}")
        return any(asked for _, asked in votes)
