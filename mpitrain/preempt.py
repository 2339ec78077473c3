"""Preemption: a signal on any rank becomes one agreed, checkpointed stop of every rank.

Slurm warns a job before it ends it: `--signal=B:USR1@120` sends SIGUSR1 to the batch script two
minutes before the time limit, and preemption or `scancel` sends SIGTERM to every task. The
handler here only records the signal; the training loop agrees on it with the other ranks at the
next step boundary, every rank takes part in the checkpoint of that same step, and the process
exits with EXIT_PREEMPTED, which the job templates turn into `scontrol requeue`.
"""

import signal

EXIT_PREEMPTED = 75  # EX_TEMPFAIL from sysexits.h: "try again later"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """Raised on every rank after the checkpoint of `step` is written; the CLI exits EXIT_PREEMPTED."""

    def __init__(self, step: int, path: str, reason: str):
        super().__init__(f"{reason}: stopped after step {step}, checkpoint {path}")
        self.step, self.path, self.reason = step, path, reason


class PreemptionFlag:
    """Records the last SIGUSR1/SIGTERM this process received; restore() puts the old handlers back.

    Handlers run in the main thread between bytecodes, so a signal that arrives during an MPI
    call is seen as soon as the call returns; nothing else happens inside the handler.
    """

    def __init__(self):
        self.signum = 0
        self._previous = {sig: signal.signal(sig, self._record) for sig in SIGNALS}

    def _record(self, signum, frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
