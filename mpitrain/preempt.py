"""Preemption: a signal on any rank becomes one agreed, checkpointed stop of every rank.

Slurm warns a job before it ends it: `--signal=B:USR1@120` sends SIGUSR1 to the batch script two
minutes before the time limit, and preemption or `scancel` sends SIGTERM to every task. The
handler here only records the signal; the training loop agrees on it with the other ranks at the
next step boundary, every rank takes part in the checkpoint of that same step, and the process
exits with EXIT_PREEMPTED, which the job templates turn into `scontrol requeue`. Ctrl-C (SIGINT)
takes the same path, checkpoint included when there is a checkpoint folder; without one the run
stops at the agreed step with EXIT_INTERRUPTED.
"""

import signal
import threading

EXIT_PREEMPTED = 75  # EX_TEMPFAIL from sysexits.h: "try again later"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a job stopped by Ctrl-C
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """Raised on every rank after an agreed stop at `step`; `path` is the checkpoint written then, or
    None without --checkpoint-dir. The CLI exits EXIT_PREEMPTED with a checkpoint, else EXIT_INTERRUPTED."""

    def __init__(self, step: int, path: str | None, reason: str):
        saved = f"checkpoint {path}" if path else "nothing saved (no --checkpoint-dir)"
        super().__init__(f"{reason}: stopped after step {step}, {saved}")
        self.step, self.path, self.reason = step, path, reason

    @property
    def exit_status(self) -> int:
        return EXIT_PREEMPTED if self.path else EXIT_INTERRUPTED


class PreemptionFlag:
    """Records the last stop signal this process received; restore() puts the old handlers back.

    SIGINT (Ctrl-C; mpirun forwards it to every rank) is always watched; SIGUSR1 and SIGTERM only
    with `checkpoints`, since without a checkpoint to write their default (ending the process at
    once) is what a scheduler expects. A second SIGINT means "stop now": it raises
    KeyboardInterrupt at once, as Python's own handler would. Handlers run in the main thread
    between bytecodes, so a signal that arrives during an MPI call is seen as soon as the call
    returns; outside the main thread nothing is installed (Python allows handlers only there).
    """

    def __init__(self, checkpoints: bool = True):
        self.signum = 0
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, *(SIGNALS if checkpoints else ())):
            self._previous[sig] = signal.signal(sig, self._record)

    def _record(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
