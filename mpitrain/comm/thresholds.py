"""`auto`: which all-reduce to run for a buffer of n bytes, from thresholds measured on the machine.

    MPITRAIN_TUNE_FILE=run.json mpirun -n 4 ...    # read thresholds from another file

The thresholds are written by `mpitrain tune` (comm/tune.py, which measures with the collectives
and so sits above them; this module sits below them).

A layout is (world size, node count), keyed "p4-n1". Its thresholds are [below_bytes, algorithm]
pairs in increasing order, the last one open-ended (null): a buffer of n bytes uses the first
algorithm whose bound exceeds n. The cache file holds one entry per layout plus the timings it
was fitted from. Layouts missing from the file fall back to DEFAULTS, measured on a 2-core
machine with the MPICH 5 wheel: on one node as it is, across nodes on two emulated hosts joined
by a TCP link (.ci/hosts-up.sh), unshaped and shaped to 1 Gbit/s.

Rank 0 reads the file and broadcasts the table, so every rank of a job makes the same choice
even if the ranks' file systems disagree.
"""

import bisect

from mpi4py import MPI

from mpitrain.comm.hier import node_group
from mpitrain.comm.tunefile import (CANDIDATES, ENV_FILE, FORMAT, cache_path, check_table, layout_key, read_file,
                                   tuned_entry)
from mpitrain.errors import MpitrainError

__all__ = ["CANDIDATES", "DEFAULTS", "ENV_FILE", "FORMAT", "Thresholds", "cache_path", "check_table", "choose",
           "default_table", "describe_source", "layout_key", "load_table", "read_file"]

KiB, MiB = 1 << 10, 1 << 20
# Measured on 2 shared cores with MPICH 5.0.2 (benchmarks/allreduce.py, `mpitrain tune`): MPI's
# own Allreduce is hard to beat below 16 KiB (one Python call costs what its whole exchange
# does); the shared-memory node sum wins while its 2L + 1 slots fit the 32 MiB L3 cache (to
# 4 MiB at 2 ranks, 2 MiB at 4); at 4 ranks MPI and the ring tie from 2 to 8 MiB; the pipelined
# ring wins above (2-3x MPI from 64 MiB).
#
# Across 2 nodes of 2 ranks (the same MPICH over TCP, benchmarks/allreduce.py) MPI wins or ties
# below 1 MiB at both link rates. Above, what wins depends on what the link costs: at 1 Gbit/s
# the link is the bottleneck and hier, which sends each byte across it once (the flat ring sends
# 1.5 times as much), runs at 1.15-1.2x MPI and at the link's rate; on the unshaped link the
# copies are, and the ring wins (2-3x MPI) while hier is still 1.3-1.9x. hier from 1 MiB is the
# choice that beats MPI at both rates; `mpitrain tune` on the real network learns the rest.
DEFAULTS = {
    "p2-n1": [[16 * KiB, "mpi"], [4 * MiB, "hier"], [None, "ring"]],
    "p4-n1": [[16 * KiB, "mpi"], [2 * MiB, "hier"], [8 * MiB, "mpi"], [None, "ring"]],
    "p4-n2": [[1 * MiB, "mpi"], [None, "hier"]],
}


def default_table(world_size: int, nodes: int) -> list:
    """DEFAULTS for this layout, else the nearest measured one: by world size on one node, the
    two-node table on several."""
    key = layout_key(world_size, nodes)
    if key in DEFAULTS:
        return DEFAULTS[key]
    if nodes > 1:
        return DEFAULTS["p4-n2"]
    return DEFAULTS["p2-n1"] if world_size <= 2 else DEFAULTS["p4-n1"]


class Thresholds:
    """nbytes -> algorithm by bisection over the upper bounds of a table."""

    def __init__(self, table: list):
        self.bounds = [bound for bound, _ in table[:-1]]
        self.names = [name for _, name in table]

    def __call__(self, nbytes: int) -> str:
        return self.names[bisect.bisect_right(self.bounds, nbytes)]


def load_table(world_size: int, nodes: int) -> list:
    """This layout's thresholds from the cache file, or the defaults."""
    entry = tuned_entry(world_size, nodes)
    return default_table(world_size, nodes) if entry is None else entry["thresholds"]


def describe_source(comm: MPI.Intracomm) -> str:
    """Which thresholds `auto` uses on comm, for the start-up line: 'tuned thresholds from PATH
    (p4-n1)' or 'built-in thresholds for p4-n1 (none tuned in PATH)'. Collective on comm; raises
    MpitrainError on every rank for an unreadable tuning file, as the first all-reduce would."""
    nodes = node_group(comm).nodes
    text, error = None, None
    if comm.rank == 0:
        path, key = cache_path(), layout_key(comm.size, nodes)
        try:
            tuned = key in read_file(path).get("layouts", {})
            text = f"tuned thresholds from {path} ({key})" if tuned else \
                f"built-in thresholds for {key} (none tuned in {path})"
        except MpitrainError as exc:
            error = str(exc)
    text, error = comm.bcast((text, error), root=0)
    if error is not None:
        raise MpitrainError(error)
    return text


_KEYVAL = MPI.Comm.Create_keyval()


def choose(nbytes: int, comm: MPI.Intracomm) -> str:
    """The algorithm `auto` runs for nbytes on comm. Collective on the first call for a comm."""
    thresholds = comm.Get_attr(_KEYVAL)
    if thresholds is None:
        nodes = node_group(comm).nodes
        table, error = None, None
        if comm.rank == 0:
            try:
                table = load_table(comm.size, nodes)
            except MpitrainError as exc:
                error = str(exc)
        table, error = comm.bcast((table, error), root=0)
        if error is not None:
            raise MpitrainError(error)
        thresholds = Thresholds(table)
        comm.Set_attr(_KEYVAL, thresholds)
    return thresholds(nbytes)
