"""`mpitrain` with one fault injected on one rank, for tests that need a real failure in a real job.

    mpirun -n 2 python tests/faults.py kill 7 1 -- train --steps 20 ...     # rank 1 SIGKILLs itself in step 7
    mpirun -n 2 python tests/faults.py signal 7 1 -- train ...              # rank 1 gets SIGUSR1 in step 7
    mpirun -n 2 python tests/faults.py skip-allreduce 3 1 -- train ...      # rank 1 skips step 3's all-reduce
    mpirun -n 2 python tests/faults.py stop 7 1 -- train ...                # rank 1 SIGSTOPs itself in step 7
    mpirun -n 2 python tests/faults.py stop-server 7 1 -- train --sync ps   # server rank 1 stops at its 7th probe

A stopping rank first writes "PID TIME" to $FAULT_STOPPED_FILE, so the test can time the abort
from the stop and SIGCONT/kill the process if the job did not end it.

The fault is a monkeypatch of the trainer's per-step calls made here, in the test process only;
the product has no hook for it. Steps count from 1, as in mpitrain's messages.
"""

import os
import signal
import sys
import time

from mpi4py import MPI

from mpitrain.comm.buckets import GradientSync
from mpitrain.parallel.ps_server import Server
from mpitrain.parallel.stage import Stage
from mpitrain.cli import main


def at_step(fault: str, step: int, rank: int) -> None:
    """Patch the step code so that `fault` happens on `rank` in step `step`."""
    if MPI.COMM_WORLD.rank != rank:
        return
    if fault == "skip-allreduce":
        layer_done, wait, waits = GradientSync.layer_done, GradientSync.wait, [0]

        def skipping_layer_done(sync, dense_index):
            if waits[0] + 1 != step:
                layer_done(sync, dense_index)

        def skipping_wait(sync):
            waits[0] += 1
            if waits[0] != step:
                wait(sync)

        GradientSync.layer_done, GradientSync.wait = skipping_layer_done, skipping_wait
        return
    action = {"kill": signal.SIGKILL, "signal": signal.SIGUSR1, "stop": signal.SIGSTOP,
              "stop-server": signal.SIGSTOP}[fault]
    owner, method = (Server, "probe") if fault == "stop-server" else (Stage, "forward_backward")
    original, calls = getattr(owner, method), [0]

    def faulty(instance, *args, **kwargs):
        calls[0] += 1
        if calls[0] == step:  # one forward/backward per step on this rank, in every layout
            if action == signal.SIGSTOP:
                with open(os.environ["FAULT_STOPPED_FILE"], "w") as handle:
                    handle.write(f"{os.getpid()} {time.time()}")
            os.kill(os.getpid(), action)
        return original(instance, *args, **kwargs)

    setattr(owner, method, faulty)


if __name__ == "__main__":
    fault, step, rank, separator, *argv = sys.argv[1:]
    assert separator == "--", "usage: faults.py FAULT STEP RANK -- MPITRAIN-ARGS"
    at_step(fault, int(step), int(rank))
    main(argv)
