"""Communication: the library's communicators, collectives and failure handling.

Every function here that takes `comm` is collective: call it on every rank of comm.
"""

from mpitrain.comm.allreduce import ALGORITHMS, allgather, allreduce, reduce_scatter
from mpitrain.comm.failure import abort, agree, install_abort_handler
from mpitrain.comm.ring import chunk_bounds
from mpitrain.comm.world import local_rank_and_size, node_comm, world

__all__ = [
    "ALGORITHMS",
    "abort",
    "agree",
    "allgather",
    "allreduce",
    "chunk_bounds",
    "install_abort_handler",
    "local_rank_and_size",
    "node_comm",
    "reduce_scatter",
    "world",
]
