"""One job's view of its hosts and its collectives, printed as JSON by rank 0 (for test_multihost.py).

    DIR/mpiexec -hosts hostA:2,hostB:2 -n 4 python tests/multihost_probe.py

Per rank: the host (MPI_Get_processor_name), the rank and size on its node (comm.world.node_comm,
an MPI shared-memory split), the node count the hierarchical all-reduce sees. Per algorithm and
buffer: whether it equals MPI Allreduce on the same input. What `auto` picks at a few sizes. The buffers hold small integers, so
every summation order gives the same bits and equality is exact; the largest is bigger than
hier's SLOT_BYTES, so it goes through in several blocks, and none divides evenly by 4.
"""

import json

import numpy as np
from mpi4py import MPI

from mpitrain.comm import allreduce, hier, tune
from mpitrain.comm.world import local_rank_and_size, world

ALGORITHMS = ("ring", "rd", "hier", "auto")


def buffers(rank: int):
    """(name, buffer) pairs with rank-dependent small-integer values."""
    rng = np.random.default_rng(rank)
    for dtype in (np.float64, np.float32):
        for count in (1, 1023, 100_003, (hier.SLOT_BYTES * 5 // 4) // np.dtype(dtype).itemsize + 7):
            yield f"{np.dtype(dtype).name}[{count}]", rng.integers(-1000, 1000, count).astype(dtype)


def main() -> None:
    comm = world()
    local_rank, local_size = local_rank_and_size(comm)
    ranks = comm.gather({"rank": comm.rank, "host": MPI.Get_processor_name(), "local_rank": local_rank,
                         "local_size": local_size, "hier_nodes": hier.node_group(comm).nodes}, root=0)
    equal, ring_bytes = {}, 0
    for name, buf in buffers(comm.rank):
        expected = np.empty_like(buf)
        comm.Allreduce(buf, expected)
        for algorithm in ALGORITHMS:
            mine = buf.copy()
            allreduce(mine, comm, algorithm)
            same = comm.allreduce(int(np.array_equal(mine, expected)), op=MPI.MIN)
            equal[f"{algorithm} {name}"] = bool(same)
        ring_bytes += buf.nbytes
    auto = {nbytes: tune.choose(nbytes, comm) for nbytes in (8, 64 << 10, 1 << 20, 64 << 20)}
    if comm.rank == 0:
        print(json.dumps({"ranks": ranks, "equal": equal, "ring_bytes": ring_bytes, "world_size": comm.size,
                          "auto": auto}))


if __name__ == "__main__":
    main()
