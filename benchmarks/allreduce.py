"""All-reduce bandwidth: every mpitrain algorithm against MPI Allreduce, in one run.

    mpirun -n 2 python benchmarks/allreduce.py
    mpirun -n 4 python benchmarks/allreduce.py --json p4.json --plot p4.png
    MPITRAIN_RANKS_PER_NODE=2 mpirun -n 4 python benchmarks/allreduce.py     # emulate 2 nodes

float32 buffers from 8 B to 256 MiB (256 MiB / 4^k, and 8 B; --step 2 for every power of 2).
For each size and algorithm: time per call (median of --trials trials, each a run of back-to-back calls timed on
the slowest rank), algbw = bytes / time, busbw = algbw * 2(p-1)/p (as nccl-tests define it: the
rate each rank's link moves data, comparable across world sizes), and the speed relative to MPI
(MPI's time / this time: above 1 is faster). `auto` shows which algorithm it picked.
"""

import argparse
import json
import sys

import numpy as np
from mpi4py import MPI

from mpitrain.comm import tune
from mpitrain.comm.hier import node_group

ALGORITHMS = ("mpi", "ring", "rd", "hier", "auto")


def human(nbytes: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def versions() -> dict:
    import mpi4py

    return {"mpi": MPI.Get_library_version().splitlines()[0].strip(), "mpi4py": mpi4py.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0]}


def run(args, comm: MPI.Intracomm) -> dict:
    sizes = sorted({8} | {args.max_bytes // args.step**i for i in range(64) if args.max_bytes // args.step**i >= 8})
    seconds = tune.measure(comm, sizes, ALGORITHMS, trials=args.trials, trial_s=args.trial_s)
    factor = 2 * (comm.size - 1) / comm.size
    rows = []
    for i, nbytes in enumerate(sizes):
        for name in ALGORITHMS:
            time_s = seconds[name][i]
            rows.append({
                "bytes": nbytes,
                "algorithm": name,
                "chosen": tune.choose(nbytes, comm) if name == "auto" else name,
                "seconds": time_s,
                "algbw_GBps": nbytes / time_s / 1e9,
                "busbw_GBps": nbytes / time_s / 1e9 * factor,
                "vs_mpi": seconds["mpi"][i] / time_s,
            })
    return {"command": " ".join(["mpirun", "-n", str(comm.size), "python", *sys.argv]),
            "world_size": comm.size, "nodes": node_group(comm).nodes, "dtype": "float32",
            "trials": args.trials, **versions(), "results": rows}


def print_table(report: dict) -> None:
    print(f"# {report['command']}")
    print(f"# world {report['world_size']} on {report['nodes']} node(s); {report['mpi']}; mpi4py "
          f"{report['mpi4py']}, numpy {report['numpy']}; median of {report['trials']} trials")
    print(f"{'size':>9}  {'algorithm':<11} {'time (us)':>11} {'algbw GB/s':>11} {'busbw GB/s':>11} {'vs MPI':>7}")
    previous = None
    for row in report["results"]:
        size = human(row["bytes"]) if row["bytes"] != previous else ""
        previous = row["bytes"]
        name = f"auto:{row['chosen']}" if row["algorithm"] == "auto" else row["algorithm"]
        print(f"{size:>9}  {name:<11} {row['seconds'] * 1e6:>11.1f} {row['algbw_GBps']:>11.3f} "
              f"{row['busbw_GBps']:>11.3f} {row['vs_mpi']:>7.2f}")
    auto = [row for row in report["results"] if row["algorithm"] == "auto"]
    large = [row["vs_mpi"] for row in auto if row["bytes"] >= 64 << 10]
    small = [1 / row["vs_mpi"] for row in auto if row["bytes"] < 64 << 10]
    if large:
        print(f"auto busbw / MPI busbw at >= 64 KiB: min {min(large):.2f}, median {np.median(large):.2f}")
    if small:
        print(f"auto time / MPI time below 64 KiB:   max {max(small):.2f}, median {np.median(small):.2f}")


def plot(report: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed (pip install matplotlib); no plot written")
        return
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name in ALGORITHMS:
        rows = [row for row in report["results"] if row["algorithm"] == name]
        axes.loglog([row["bytes"] for row in rows], [row["busbw_GBps"] for row in rows], marker="o",
                    label=name, linestyle="--" if name == "mpi" else "-")
    axes.set_xlabel("buffer size (bytes, float32)")
    axes.set_ylabel("bus bandwidth (GB/s)")
    axes.set_title(f"all-reduce, {report['world_size']} ranks on {report['nodes']} node(s)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-bytes", type=int, default=256 << 20, help="largest buffer (default 256 MiB)")
    parser.add_argument("--step", type=int, default=4, choices=(2, 4), help="size ratio between rows")
    parser.add_argument("--trials", type=int, default=5, help="timed trials per size and algorithm")
    parser.add_argument("--trial-s", type=float, default=0.02, help="seconds of back-to-back calls per trial")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="busbw against size, log-log (needs matplotlib)")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD.Dup()
    report = run(args, comm)
    if comm.rank == 0:
        print_table(report)
        if args.json:
            with open(args.json, "w") as out:
                json.dump(report, out, indent=1)
        if args.plot:
            plot(report, args.plot)


if __name__ == "__main__":
    main()
