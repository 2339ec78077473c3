"""The preemption flag records SIGUSR1/SIGTERM and puts the previous handlers back."""

import os
import signal
import time

from mpitrain.preempt import EXIT_PREEMPTED, PreemptionFlag


def wait_for(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)


def test_signals_are_recorded_not_fatal():
    flag = PreemptionFlag()
    try:
        assert flag.signum == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        wait_for(lambda: flag.signum)
        assert flag.signum == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(lambda: flag.signum == signal.SIGTERM)
        assert flag.signum == signal.SIGTERM
    finally:
        flag.restore()


def test_restore_puts_back_the_previous_handlers():
    previous = signal.getsignal(signal.SIGTERM)
    PreemptionFlag().restore()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_requeue_status_is_distinct():
    assert EXIT_PREEMPTED not in (0, 1, 2, 124, 137, 143)
