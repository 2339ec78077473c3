"""`mpitrain tune`: measure every all-reduce algorithm per buffer size and save the thresholds
that `auto` reads (comm/thresholds.py); the same for the reduce-scatter + all-gather pair that
--zero runs on each bucket (the "sharded" thresholds); on nodes of equal size, also the buffer size from which
`hier` crosses nodes from every local rank rather than from the leaders alone (comm/hier.py),
which depends on the network (measured on a shaped 1 Gbit/s link: 1 MiB; unshaped, lower).

    mpirun -n 4 mpitrain tune                      # measure every algorithm, 8 B to 64 MiB, save
    MPITRAIN_TUNE_FILE=run.json mpirun -n 4 ...    # read (and write) another file
"""

import json
import os
import time

import numpy as np
from mpi4py import MPI

from mpitrain.comm.allreduce import allreduce, shard_gather_schedule, shard_reduce_schedule
from mpitrain.comm.hier import node_group
from mpitrain.comm.ring import chunk_bounds, complete
from mpitrain.comm.thresholds import (CANDIDATES, DEFAULTS, ENV_FILE, FORMAT, SHARDED_CANDIDATES, SHARDED_DEFAULTS,
                                      MiB, Thresholds, cache_path, check_table, choose, default_table, layout_key,
                                      load_table, read_file)
from mpitrain.errors import MpitrainError
from mpitrain.outputs import atomic_write, write_error

__all__ = ["CANDIDATES", "DEFAULTS", "ENV_FILE", "FORMAT", "SHARDED_CANDIDATES", "SHARDED_DEFAULTS", "Thresholds",
           "cache_path", "check_table", "choose", "default_table", "fit", "fit_crossover", "layout_key", "load_table",
           "measure", "measure_crossover", "read_file", "save", "tune"]


# ---------------------------------------------------------------------------- measuring


def _seconds_per_call(comm: MPI.Intracomm, call, reps: int) -> float:
    """Seconds per call of `reps` back-to-back calls, the slowest rank's mean. Collective."""
    comm.Barrier()
    started = time.perf_counter()
    for _ in range(reps):
        call()
    return comm.allreduce((time.perf_counter() - started) / reps, op=MPI.MAX)


def time_allreduce(buf: np.ndarray, comm: MPI.Intracomm, algorithm: str, reps: int) -> float:
    """Seconds per call of `reps` back-to-back all-reduces, the slowest rank's mean. Collective."""
    return _seconds_per_call(comm, lambda: allreduce(buf, comm, algorithm), reps)


def time_halves(buf: np.ndarray, comm: MPI.Intracomm, algorithm: str, reps: int) -> float:
    """Seconds per reduce-scatter + all-gather pair on equal chunks (what --zero runs on a bucket),
    over `reps` back-to-back pairs, the slowest rank's mean. Collective."""
    chunks = chunk_bounds(buf.size, comm.size)

    def pair():
        complete(shard_reduce_schedule(buf, comm, algorithm, chunks))
        complete(shard_gather_schedule(buf, comm, algorithm, chunks))

    return _seconds_per_call(comm, pair, reps)


def measure(comm: MPI.Intracomm, sizes: list[int], algorithms, trials: int = 5, trial_s: float = 0.005,
            dtype=np.float32, sharded: bool = False) -> dict[str, list[float]]:
    """{algorithm: median seconds per call at each size (bytes)} of the all-reduce, or with
    sharded=True of the reduce-scatter + all-gather pair. Collective.

    Trials of the algorithms alternate, so a burst of load from another process hits them all
    alike; each trial repeats the call for about trial_s seconds (the same count on every rank).
    """
    return _alternate(comm, sizes, {name: (name, None) for name in algorithms}, trials, trial_s, dtype,
                      time_halves if sharded else time_allreduce)


def measure_crossover(comm: MPI.Intracomm, sizes: list[int], trials: int = 5, trial_s: float = 0.005,
                      dtype=np.float32) -> tuple[int | None, dict[str, list[float]]]:
    """(hier's two-level threshold, {variant: median seconds per call at each size}): `hier` timed
    with every local rank crossing nodes and with the leaders alone, alternating as `measure`.
    Collective; for comms on nodes of equal size (node_group(comm).cross)."""
    group = node_group(comm)

    def crossing_from(threshold):
        return lambda: setattr(group, "two_level_bytes", threshold)

    variants = {"two-level": ("hier", crossing_from(0)), "leaders": ("hier", crossing_from(None))}
    saved = group.two_level_bytes
    try:
        seconds = _alternate(comm, sizes, variants, trials, trial_s, dtype)
    finally:
        group.two_level_bytes = saved
    return fit_crossover(sizes, seconds["two-level"], seconds["leaders"]), seconds


def _alternate(comm, sizes, variants: dict, trials: int, trial_s: float, dtype,
               timer=time_allreduce) -> dict[str, list[float]]:
    """{variant: median seconds per call at each size}; variants: {name: (algorithm, a function to
    call before each timing of it, or None)}; timer: time_allreduce or time_halves. Collective."""
    def timed(buf, name, reps):
        algorithm, prepare = variants[name]
        if prepare is not None:
            prepare()
        return timer(buf, comm, algorithm, reps)

    seconds = {name: [] for name in variants}
    for nbytes in sizes:
        buf = np.zeros(max(1, nbytes // np.dtype(dtype).itemsize), dtype=dtype)
        reps = {}
        for name in variants:
            timed(buf, name, 1)
            reps[name] = max(1, min(2000, int(trial_s / max(timed(buf, name, 1), 1e-7))))
        runs = {name: [] for name in variants}
        for _ in range(trials):
            for name in variants:
                runs[name].append(timed(buf, name, reps[name]))
        for name in variants:
            seconds[name].append(float(np.median(runs[name])))
    return seconds


def fit_crossover(sizes: list[int], two_level: list[float], leaders: list[float]) -> int | None:
    """The smallest size from which the two-level scheme is at least as fast at every larger
    measured size too (None: it loses at the largest)."""
    crossover = None
    for size, mine, theirs in reversed(list(zip(sizes, two_level, leaders))):
        if mine > theirs:
            break
        crossover = size
    return crossover


def fit(sizes: list[int], seconds: dict[str, list[float]]) -> list:
    """Thresholds from timings: the fastest algorithm at each size, runs merged.

    A lone winner between two sizes that agree is dropped when their algorithm was within 10%
    there: one noisy size should not carve a band of its own.
    """
    names = list(seconds)
    best = [min(names, key=lambda name: seconds[name][i]) for i in range(len(sizes))]
    for i in range(1, len(sizes) - 1):
        neighbour = best[i - 1]
        if best[i + 1] == neighbour != best[i] and seconds[neighbour][i] <= 1.1 * seconds[best[i]][i]:
            best[i] = neighbour
    table = []
    for i, name in enumerate(best):
        if table and table[-1][1] == name:
            continue
        if table:
            table[-1][0] = sizes[i]
        table.append([None, name])
    return table


def save(path: str, key: str, table: list, sizes: list[int], seconds: dict, hier: dict | None = None,
         sharded: tuple[list, dict] | None = None) -> None:
    """Merge this layout's entry into the cache file, written atomically (mpitrain/outputs.py);
    hier: {"two_level_bytes": ..., "bytes": [...], "seconds": {variant: [...]}} where measured;
    sharded: (thresholds, {algorithm: seconds per size}) of the reduce-scatter + all-gather pair."""
    contents = read_file(path) or {"format": FORMAT}
    contents["mpi"] = MPI.Get_library_version().splitlines()[0].strip()
    entry = {"thresholds": table, "measured": {"bytes": sizes, "seconds": seconds},
             "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if sharded is not None:
        entry["sharded_thresholds"] = sharded[0]
        entry["measured"]["sharded_seconds"] = sharded[1]
    if hier is not None:
        entry["hier_two_level_bytes"] = hier["two_level_bytes"]
        entry["measured"]["hier"] = {"bytes": hier["bytes"], "seconds": hier["seconds"]}
    contents.setdefault("layouts", {})[key] = entry
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as exc:
        raise write_error(path, exc) from None
    atomic_write(path, lambda out: out.write(json.dumps(contents, indent=1).encode()), binary=True)


def tune(comm: MPI.Intracomm, max_bytes: int = 64 * MiB, trials: int = 5,
         path: str | None = None) -> tuple[str, list, list]:
    """Measure every candidate at powers of two from 8 B to max_bytes, as an all-reduce and as the
    reduce-scatter + all-gather pair of --zero; rank 0 saves both fits to path (default
    cache_path()). Returns (layout key, thresholds, sharded thresholds) on every rank. Collective
    on comm.
    """
    sizes = [1 << e for e in range(3, max_bytes.bit_length())]
    group, hier = node_group(comm), None
    if group.cross is not None:  # nodes of equal size: first where hier should cross from every rank
        hier_sizes = [size for size in sizes if 16 << 10 <= size <= 16 * MiB] or sizes[-1:]
        crossover, hier_seconds = measure_crossover(comm, hier_sizes, trials)
        hier = {"two_level_bytes": crossover, "bytes": hier_sizes, "seconds": hier_seconds}
        group.two_level_bytes = crossover  # so that hier's timings below are those of the tuned hier
    seconds = measure(comm, sizes, CANDIDATES, trials)
    table = fit(sizes, seconds)
    sharded_seconds = measure(comm, sizes, SHARDED_CANDIDATES, trials, sharded=True)
    sharded = fit(sizes, sharded_seconds)
    key = layout_key(comm.size, node_group(comm).nodes)
    error = None
    if comm.rank == 0:
        try:
            save(path or cache_path(), key, table, sizes, seconds, hier, (sharded, sharded_seconds))
        except MpitrainError as exc:
            error = str(exc)
    error = comm.bcast(error, root=0)
    if error is not None:
        raise MpitrainError(error)
    return key, table, sharded
