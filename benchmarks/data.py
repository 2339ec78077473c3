"""Rows/s a rank reads from contiguous, chunked, gzip- and lzf-compressed HDF5, as training reads them.

    mpirun -n 2 python benchmarks/data.py --json data.json      # the README's table
    python benchmarks/data.py --rows 4000 --epochs 1            # a quick look

Rank 0 writes one file per layout (the same float32 rows; chunked ones in chunks of --chunk-rows rows,
1000 x 784 by default: 3 MiB, three times h5py's default 1 MiB chunk cache). Then each rank reads what
training reads, through mpitrain's H5Dataset and, as the baseline in the same run, through a plain
h5py dataset opened with default settings, indexed with the same sorted rows:
- shard: its contiguous block of the training rows, in one read (then trains from memory);
- global: its slice of every global batch of --epochs epochs of the seeded permutation (one read per
  step); before the first epoch the ranks read (and decompress) every chunk once between them and
  share the blocks (H5Dataset.share_blocks, timed as part of the first epoch), so every epoch
  gathers from memory.
rows/s = rows read / seconds, slowest rank, best of --repeat; the h5py baseline reads the first epoch
(stopped after --budget-s). "time vs contiguous" compares mpitrain's reads of the same rows (global:
over all --epochs): the chunked and compressed global reads should stay within 2x of contiguous.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import h5py
import mpi4py
import numpy as np
from mpi4py import MPI

from mpitrain.comm import world
from mpitrain.data.hdf5 import H5Dataset
from mpitrain.data.partition import split_validation, uniform_rows
from mpitrain.data.sampler import GlobalSampler

LAYOUTS = {"contiguous": {}, "chunked": {"chunks": True}, "gzip": {"compression": "gzip"},
           "lzf": {"compression": "lzf"}}


def write_files(folder: str, rows: int, features: int, chunk_rows: int) -> dict:
    x = np.random.default_rng(0).standard_normal((rows, features)).astype(np.float32)
    y = np.arange(rows) % 10
    paths = {}
    for name, options in LAYOUTS.items():
        path = os.path.join(folder, f"bench-{name}.h5")
        with h5py.File(path, "w") as f:
            chunks = dict(chunks=(chunk_rows, features), compression=options.get("compression")) if options else {}
            f.create_dataset("x", data=x, **chunks)
            f.create_dataset("y", data=y, **({"chunks": (chunk_rows,), "compression": options.get("compression")}
                                            if options else {}))
        paths[name] = path
    return paths


def row_sets(n_rows: int, sampler: str, batch: int, epochs: int, comm) -> list[list[np.ndarray]]:
    """Per epoch, the sorted row arrays this rank reads under `sampler`, in order (shard: one epoch, one read)."""
    train_rows, _ = split_validation(n_rows, 0.1, 0)
    if sampler == "shard":
        return [[uniform_rows(train_rows, comm.rank, comm.size)]]
    sampler = GlobalSampler(train_rows, batch, comm.rank, comm.size, seed=0)
    return [list(sampler.batches(epoch)) for epoch in range(epochs)]


def timed(read, sets, comm, budget_s: float) -> float:
    """Rows/s of the slowest rank reading `sets` in order (stopping after budget_s seconds)."""
    comm.Barrier()
    started, rows = time.perf_counter(), 0
    for rows_now in sets:
        read(rows_now)
        rows += len(rows_now)
        if time.perf_counter() - started > budget_s:
            break
    elapsed = time.perf_counter() - started
    return comm.allreduce(rows / elapsed, op=MPI.MIN)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--features", type=int, default=784)
    parser.add_argument("--chunk-rows", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch (default 128)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of global-sampler reads (default 3)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N fresh opens (default 3)")
    parser.add_argument("--budget-s", type=float, default=10.0,
                        help="stop a variant after this many seconds (the slow baselines) (default 10)")
    parser.add_argument("--dir", help="where the files go (default: a temporary folder on rank 0's node)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args()
    comm = world()
    folder = comm.bcast((args.dir or tempfile.mkdtemp(prefix="mpitrain-bench-")) if comm.rank == 0 else None)
    paths = comm.bcast(write_files(folder, args.rows, args.features, args.chunk_rows) if comm.rank == 0 else None)

    results = []
    for sampler in ("shard", "global"):
        epochs = row_sets(args.rows, sampler, args.batch_size, args.epochs, comm)
        for layout, path in paths.items():
            record = {"sampler": sampler, "layout": layout}
            # Best of --repeat fresh opens, mpitrain and h5py alternating, so neither gets a warmer page cache.
            for _ in range(args.repeat):
                with H5Dataset(path, rereads=sampler == "global") as dataset:
                    # As training opens it (data/rank.py:open_dataset): under the global sampler the
                    # ranks decompress each chunk once between them and share the blocks; that time
                    # counts in the first epoch.
                    comm.Barrier()
                    started = time.perf_counter()
                    dataset.share_blocks(comm)
                    share_s = comm.allreduce(time.perf_counter() - started, op=MPI.MAX)
                    speeds = [timed(dataset.read_x, sets, comm, args.budget_s) for sets in epochs]
                    first_rows = sum(len(rows) for rows in epochs[0])
                    speeds[0] = first_rows / (first_rows / speeds[0] + share_s)
                with h5py.File(path, "r") as f:
                    plain = timed(lambda rows: f["x"][rows], epochs[0], comm, args.budget_s)
                best = {"mpitrain_rows_per_s": speeds[0], "h5py_rows_per_s": plain}
                if len(speeds) > 1:
                    best["mpitrain_later_epochs_rows_per_s"] = float(np.mean(speeds[1:]))
                    best["mpitrain_all_epochs_rows_per_s"] = len(speeds) / sum(1 / v for v in speeds)
                for key, value in best.items():
                    record[key] = max(record.get(key, 0.0), value)
            results.append(record)
    for record in results:
        base = next(r for r in results if r["sampler"] == record["sampler"] and r["layout"] == "contiguous")
        key = "mpitrain_all_epochs_rows_per_s" if record["sampler"] == "global" else "mpitrain_rows_per_s"
        record["time_vs_contiguous"] = base[key] / record[key]

    if comm.rank == 0:
        command = "mpirun -n {} python {}".format(comm.size, " ".join(sys.argv))
        versions = {"python": platform.python_version(), "numpy": np.__version__, "h5py": h5py.__version__,
                    "hdf5": h5py.version.hdf5_version, "mpi4py": mpi4py.__version__,
                    "mpi": MPI.Get_library_version().splitlines()[0]}
        print(f"{command}\n{comm.size} rank(s), {args.rows} rows x {args.features} float32, chunks of "
              f"{args.chunk_rows} rows, global batch {args.batch_size}; {', '.join(f'{k} {v}' for k, v in versions.items())}")
        print(f"{'sampler':<8} {'layout':<11} {'mpitrain rows/s':>16} {'later epochs':>13} {'all epochs':>11} "
              f"{'h5py rows/s':>12} {'time vs contiguous':>19}")
        for r in results:
            later = r.get("mpitrain_later_epochs_rows_per_s")
            overall = r.get("mpitrain_all_epochs_rows_per_s")
            print(f"{r['sampler']:<8} {r['layout']:<11} {r['mpitrain_rows_per_s']:>16,.0f} "
                  f"{f'{later:,.0f}' if later else '-':>13} {f'{overall:,.0f}' if overall else '-':>11} "
                  f"{r['h5py_rows_per_s']:>12,.0f} {r['time_vs_contiguous']:>18.2f}x")
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"command": command, "world_size": comm.size, "rows": args.rows, "features": args.features,
                       "repeat": args.repeat,
                           "chunk_rows": args.chunk_rows, "batch_size": args.batch_size, "epochs": args.epochs,
                           "versions": versions, "results": results}, handle, indent=1)
        if not args.dir:
            for path in paths.values():
                os.unlink(path)
            os.rmdir(folder)


if __name__ == "__main__":
    main()
