"""Communication: the library's communicators, collectives and failure handling.

Every function here that takes `comm` is collective: call it on every rank of comm.
"""

from mpitrain.comm.allreduce import ALGORITHMS, allreduce
from mpitrain.comm.failure import abort, agree, install_abort_handler
from mpitrain.comm.world import local_rank_and_size, node_comm, world

__all__ = [
    "ALGORITHMS",
    "abort",
    "agree",
    "allreduce",
    "install_abort_handler",
    "local_rank_and_size",
    "node_comm",
    "world",
]
