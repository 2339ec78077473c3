"""Sub-communicators for layouts smaller than the world: built by world size, never chosen by rank."""

from contextlib import contextmanager

import pytest
from mpi4py import MPI


@contextmanager
def groups_of(comm: MPI.Intracomm, size: int):
    """Split comm into consecutive groups of `size` ranks and yield this rank's group, or None for
    the ranks left over. Skips the test when comm has fewer than `size` ranks. Collective on comm."""
    if comm.size < size:
        pytest.skip(f"needs {size} ranks; this world has {comm.size}")
    full = comm.size // size * size
    group = comm.Split(comm.rank // size if comm.rank < full else MPI.UNDEFINED, key=comm.rank)
    try:
        yield None if group == MPI.COMM_NULL else group
    finally:
        if group != MPI.COMM_NULL:
            group.Free()
