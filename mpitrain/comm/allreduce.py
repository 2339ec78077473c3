"""`allreduce(buf, comm, algorithm)`: the one entry point for summing a buffer over ranks.

Host (NumPy) buffers go straight to MPI. Device (CuPy) buffers are synchronized and staged
through a host copy first: the MPICH wheel is not CUDA-aware.
"""

import numpy as np
from mpi4py import MPI

from mpitrain.comm.ring import ring_allreduce
from mpitrain.errors import MpitrainError

ALGORITHMS = ("ring", "mpi")


def _host_allreduce(buf: np.ndarray, comm: MPI.Intracomm, algorithm: str) -> None:
    if algorithm == "ring":
        ring_allreduce(buf, comm)
    else:
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)


def allreduce(buf, comm: MPI.Intracomm, algorithm: str = "ring") -> None:
    """buf <- sum over ranks, in place; 1-D contiguous NumPy or CuPy array. Collective on comm."""
    if algorithm not in ALGORITHMS:
        raise MpitrainError(f"allreduce algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    if buf.ndim != 1 or not buf.flags.c_contiguous:
        raise MpitrainError(f"allreduce needs a 1-D contiguous buffer, got shape {buf.shape}")
    if isinstance(buf, np.ndarray):
        _host_allreduce(buf, comm, algorithm)
        return
    from mpitrain.backend import staged_on_host

    with staged_on_host(buf) as host:
        _host_allreduce(host, comm, algorithm)
