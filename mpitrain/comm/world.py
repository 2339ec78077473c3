"""Communicators the library owns: a private clone of COMM_WORLD and the per-node split.

Library traffic runs on a `Dup()` of COMM_WORLD so its messages can never match a user's.
"""

import os
from functools import lru_cache

from mpi4py import MPI

from mpitrain.errors import MpitrainError


@lru_cache(maxsize=None)
def world() -> MPI.Intracomm:
    """The library's default communicator: a clone of COMM_WORLD, made once (collective on first call).
    MPICH's shared-memory names are removed here, once all ranks have them mapped (mpitrain/shm.py)."""
    from mpitrain.shm import release_own_segments

    comm = MPI.COMM_WORLD.Dup()
    release_own_segments(comm)
    return comm


def emulated_ranks_per_node() -> int | None:
    """MPITRAIN_RANKS_PER_NODE, when set, pretends every run of that many consecutive ranks of
    COMM_WORLD is a node."""
    value = os.environ.get("MPITRAIN_RANKS_PER_NODE")
    if value is None:
        return None
    try:
        per_node = int(value)
    except ValueError:
        per_node = 0
    if per_node < 1:
        raise MpitrainError(f"MPITRAIN_RANKS_PER_NODE={value!r}: expected a positive integer")
    return per_node


def node_comm(comm: MPI.Intracomm) -> MPI.Intracomm:
    """Ranks of `comm` that share this rank's node (an MPI shared-memory split). Collective on comm.

    The local rank comes from MPI itself, not from launcher variables, so it is right under
    mpirun, srun and any other launcher. MPITRAIN_RANKS_PER_NODE emulates smaller nodes, of
    consecutive world ranks whatever comm is: a grid's data-parallel group {0, 2} spans two
    emulated nodes of 2, as it would two real ones.
    """
    per_node = emulated_ranks_per_node()
    if per_node is not None:
        return comm.Split(color=MPI.COMM_WORLD.Get_rank() // per_node, key=comm.rank)
    return comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)


def local_rank_and_size(comm: MPI.Intracomm) -> tuple[int, int]:
    """(rank within the node, ranks on the node). Collective on comm."""
    node = node_comm(comm)
    try:
        return node.rank, node.size
    finally:
        node.Free()
