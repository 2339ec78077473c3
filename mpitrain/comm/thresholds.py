"""`auto`: which algorithm sums a buffer of n bytes, from thresholds measured on the machine.

    MPITRAIN_TUNE_FILE=run.json mpirun -n 4 ...    # read thresholds from another file

The thresholds are written by `mpitrain tune` (comm/tune.py, which measures with the collectives
and so sits above them; this module sits below them).

A layout is (world size, node count), keyed "p4-n1". Its thresholds are [below_bytes, algorithm]
pairs in increasing order, the last one open-ended (null): a buffer of n bytes uses the first
algorithm whose bound exceeds n. The cache file holds one entry per layout plus the timings it
was fitted from. Layouts missing from the file fall back to DEFAULTS, measured on a 2-core
machine with the MPICH 5 wheel: on one node as it is, across nodes on two emulated hosts joined
by a TCP link (.ci/hosts-up.sh), unshaped and shaped to 1 Gbit/s.

Two tables per layout: one for the all-reduce (--zero 0), one ("sharded") for the reduce-scatter
followed by the all-gather that --zero 1 and 2 run on a bucket instead. They differ because the
algorithms' halves do not cost what their all-reduces do: `hier`'s all-reduce on one node has
every rank add the whole buffer, its reduce-scatter only the rank's own 1/L of it.

Rank 0 reads the file and broadcasts the table, so every rank of a job makes the same choice
even if the ranks' file systems disagree.
"""

import bisect

from mpi4py import MPI

from mpitrain.comm.hier import node_group
from mpitrain.comm.tunefile import (CANDIDATES, ENV_FILE, FORMAT, SHARDED_CANDIDATES, cache_path, check_table,
                                   layout_key, read_file, tuned_entry)
from mpitrain.errors import MpitrainError

__all__ = ["CANDIDATES", "DEFAULTS", "ENV_FILE", "FORMAT", "SHARDED_CANDIDATES", "SHARDED_DEFAULTS", "Thresholds",
           "cache_path", "check_table", "choose", "default_table", "describe_source", "layout_key", "load_table",
           "read_file"]

KiB, MiB = 1 << 10, 1 << 20
# Measured on 2 shared cores (a Xeon VM, 2 MiB of L2 per core) with MPICH 5.0.2 (`mpitrain tune`,
# two runs, and benchmarks/allreduce.py): MPI's own Allreduce is hard to beat below 32 KiB (one
# Python call costs what its whole exchange does); at 2 ranks the shared-memory node sum is ahead
# from 32 KiB to below 1 MiB (1.0-1.3x MPI; a tie at 512 KiB, where the table hands over to MPI),
# behind from 1 MiB (0.6-0.9x: every rank adds the whole buffer), and the pipelined ring ties MPI
# at 2 MiB and leads from 4 MiB (1.1-2.5x), so the table takes the ring from 2 MiB. At 4 ranks
# MPI leads below 2 MiB, ties the ring at 2-4 MiB, and the ring leads from 4 MiB.
#
# Across 2 nodes of 2 ranks (the same MPICH over TCP, benchmarks/allreduce.py) MPI wins or ties
# below 1 MiB at both link rates. Above, what wins depends on what the link costs: at 1 Gbit/s
# the link is the bottleneck and hier, which sends each byte across it once (the flat ring sends
# 1.5 times as much), runs at 1.15-1.2x MPI and at the link's rate; on the unshaped link the
# copies are, and the ring wins (2-3x MPI) while hier is still 1.3-1.9x. hier from 1 MiB is the
# choice that beats MPI at both rates; `mpitrain tune` on the real network learns the rest.
DEFAULTS = {
    "p2-n1": [[32 * KiB, "mpi"], [512 * KiB, "hier"], [2 * MiB, "mpi"], [None, "ring"]],
    "p4-n1": [[4 * MiB, "mpi"], [None, "ring"]],
    "p4-n2": [[1 * MiB, "mpi"], [None, "hier"]],
}
# The reduce-scatter + all-gather pair of --zero, the same machines and runs. On one node hier's
# halves (each rank adds only its own chunk, and the all-gather is one copy in and one out) lead
# from 32 KiB to 1 MiB at 2 ranks (1.0-1.6x MPI's Reduce_scatter + Allgatherv) and to 4 MiB at 4
# ranks (1.2-1.7x); the pipelined ring leads from the next size up, 2 and 8 MiB (1.5-1.9x MPI at
# 2 ranks, 1.1-1.4x at 4).
# Across the two emulated hosts the ring leads from 8 MiB at both link rates (1.1-1.2x MPI);
# below, the link decides: at 1 Gbit/s the ring from 32 KiB (1.15-1.4x), unshaped MPI (1.06-2.4x
# the ring); MPI is the default there, as a fast network favours it, and `mpitrain tune` learns
# a slow one.
SHARDED_DEFAULTS = {
    "p2-n1": [[32 * KiB, "mpi"], [2 * MiB, "hier"], [None, "ring"]],
    "p4-n1": [[32 * KiB, "mpi"], [8 * MiB, "hier"], [None, "ring"]],
    "p4-n2": [[8 * MiB, "mpi"], [None, "ring"]],
}


def default_table(world_size: int, nodes: int, sharded: bool = False) -> list:
    """DEFAULTS (SHARDED_DEFAULTS for --zero's halves) for this layout, else the nearest measured
    one: by world size on one node, the two-node table on several."""
    defaults = SHARDED_DEFAULTS if sharded else DEFAULTS
    key = layout_key(world_size, nodes)
    if key in defaults:
        return defaults[key]
    if nodes > 1:
        return defaults["p4-n2"]
    return defaults["p2-n1"] if world_size <= 2 else defaults["p4-n1"]


class Thresholds:
    """nbytes -> algorithm by bisection over the upper bounds of a table."""

    def __init__(self, table: list):
        self.bounds = [bound for bound, _ in table[:-1]]
        self.names = [name for _, name in table]

    def __call__(self, nbytes: int) -> str:
        return self.names[bisect.bisect_right(self.bounds, nbytes)]


def load_table(world_size: int, nodes: int, sharded: bool = False) -> list:
    """This layout's thresholds (sharded: for --zero's halves) from the cache file, or the defaults."""
    entry = tuned_entry(world_size, nodes) or {}
    table = entry.get("sharded_thresholds" if sharded else "thresholds")
    return default_table(world_size, nodes, sharded) if table is None else table


def describe_source(comm: MPI.Intracomm, sharded: bool = False) -> str:
    """Which thresholds `auto` uses on comm (sharded: those of --zero's reduce-scatter + all-gather),
    for the start-up line: 'tuned thresholds from PATH (p4-n1)', or 'built-in thresholds for
    p4-n1 (none tuned in PATH)', or under --zero with a file from before the pair was tuned,
    'built-in thresholds for p4-n1 (PATH tunes its all-reduce only: rerun mpitrain tune)'.
    Collective on comm; raises MpitrainError on every rank for an unreadable tuning file, as the
    first all-reduce would."""
    nodes = node_group(comm).nodes
    text, error = None, None
    if comm.rank == 0:
        path, key = cache_path(), layout_key(comm.size, nodes)
        try:
            entry = read_file(path).get("layouts", {}).get(key)
            if entry is None:
                text = f"built-in thresholds for {key} (none tuned in {path})"
            elif sharded and "sharded_thresholds" not in entry:
                text = f"built-in thresholds for {key} ({path} tunes its all-reduce only: rerun mpitrain tune)"
            else:
                text = f"tuned thresholds from {path} ({key})"
        except MpitrainError as exc:
            error = str(exc)
    text, error = comm.bcast((text, error), root=0)
    if error is not None:
        raise MpitrainError(error)
    return text


_KEYVALS = {False: MPI.Comm.Create_keyval(), True: MPI.Comm.Create_keyval()}


def choose(nbytes: int, comm: MPI.Intracomm, sharded: bool = False) -> str:
    """The algorithm `auto` runs for nbytes on comm: for its all-reduce, or with sharded=True for
    its reduce-scatter and all-gather (--zero). Collective on the first call for a comm and kind."""
    keyval = _KEYVALS[sharded]
    thresholds = comm.Get_attr(keyval)
    if thresholds is None:
        nodes = node_group(comm).nodes
        table, error = None, None
        if comm.rank == 0:
            try:
                table = load_table(comm.size, nodes, sharded)
            except MpitrainError as exc:
                error = str(exc)
        table, error = comm.bcast((table, error), root=0)
        if error is not None:
            raise MpitrainError(error)
        thresholds = Thresholds(table)
        comm.Set_attr(keyval, thresholds)
    return thresholds(nbytes)
