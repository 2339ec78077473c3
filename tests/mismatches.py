"""Two ranks that disagree about one exchange of the library, one case per kind of mismatch, for
tests/test_fingerprint.py (the checker aborts the job, so each case is a job of its own).

    mpirun -n 2 python tests/mismatches.py length          # allreduce of LENGTHS[rank] floats
    MPITRAIN_CHECK_WAIT_S=1 mpirun -n 2 python tests/mismatches.py missing
    mpirun -n 2 python tests/mismatches.py ps DIR          # a parameter-server run; data written to DIR

Every case prints "no mismatch" if the checker let it through.
"""

import dataclasses
import os
import sys

import numpy as np
from mpi4py import MPI

from mpitrain.comm import allgather, allreduce, fingerprint
from mpitrain.comm.buckets import GradientSync
from mpitrain.parallel.mappings import TensorGroup
from mpitrain.parallel.pipeline import StageLink

LENGTHS = (1024, 1000)          # per rank, for the length, dp, tp and pp cases
DTYPES = ("float32", "float64")
ALGORITHMS = ("ring", "rd")
TP_COLUMNS = (8, 6)
PP_WIDTHS = (8, 6)              # stage 0 sends (4, 8); stage 1 expects (4, 6)
PP_MICRO = (1, 0)               # stage 0 sends micro-batch 1; stage 1 waits for micro-batch 0
PS_SHORT_BY = 1                 # the worker believes the server holds one parameter fewer


def run(case: str, comm: MPI.Intracomm, rank: int, folder: str | None) -> None:
    if case == "length":
        allreduce(np.ones(LENGTHS[rank], np.float32), comm, "ring")
    elif case == "dtype":
        allreduce(np.ones(16, DTYPES[rank]), comm, "ring")
    elif case == "operation":
        buf = np.ones(16, np.float32)
        allreduce(buf, comm, "ring") if rank == 0 else allgather(buf, comm)
    elif case == "algorithm":
        allreduce(np.ones(16, np.float32), comm, ALGORITHMS[rank])
    elif case == "missing":
        if rank == 0:
            allreduce(np.ones(16, np.float32), comm, "ring")
        comm.Barrier()
    elif case == "dp":
        grads = np.ones(LENGTHS[rank], np.float32)
        GradientSync(grads, [(0, 512), (512, LENGTHS[rank])], comm, "ring", overlap=False).wait()
    elif case == "tp":
        TensorGroup(comm).sum(np.ones((4, TP_COLUMNS[rank]), np.float32))
    elif case == "pp":
        link = StageLink(comm, np)
        if rank == 0:
            link.send_activation(np.ones((4, PP_WIDTHS[0]), np.float32), 0)
        else:
            link.recv_activation((4, PP_WIDTHS[1]), np.float32, 0)
        link.finish()
    elif case == "pp-tag":
        link = StageLink(comm, np)
        if rank == 0:
            link.send_activation(np.ones((4, 8), np.float32), PP_MICRO[0])
        else:
            link.recv_activation((4, 8), np.float32, PP_MICRO[1])
        link.finish()
    elif case == "ps":
        run_ps(comm, rank, folder)
    else:
        raise SystemExit(f"unknown case {case}")


def run_ps(comm: MPI.Intracomm, rank: int, folder: str) -> None:
    """One worker (rank 0), one server (rank 1); the worker's idea of the server's range is short."""
    from mpitrain.config import TrainConfig, validate
    from mpitrain.data import synth
    from mpitrain.parallel import ps
    from mpitrain.train import train

    path = os.path.join(folder, "ps.h5")
    if rank == 0:
        synth.write_h5(path, *synth.make_classification(120, 6, 3, seed=1))
    comm.Barrier()
    if rank == 0:
        init = ps.WorkerLink.__init__

        def short_link(link, comm, roles, model):
            (start, stop), = roles.bounds
            init(link, comm, dataclasses.replace(roles, bounds=((start, stop - PS_SHORT_BY),)), model)

        ps.WorkerLink.__init__ = short_link
    config = validate(dataclasses.replace(TrainConfig(), model="6-4-3", batch_size=12, steps=2, device="cpu",
                                          progress=False, sync="ps", data=path, check_collectives=True))
    train(config, comm)


if __name__ == "__main__":
    fingerprint.enable()
    world = MPI.COMM_WORLD.Dup()
    run(sys.argv[1], world, world.rank, sys.argv[2] if len(sys.argv) > 2 else None)
    print("no mismatch", flush=True)
