"""One gradient bucket summed in float32 and in float16 / bfloat16 (--grad-dtype), in one run, and
the link speed below which compression would win.

    mpirun -n 2 python benchmarks/compress.py
    mpirun -n 4 python benchmarks/compress.py --mb 16 --json compress.json

Every case sums the same --mb MiB float32 bucket (a copy of this rank's random gradient, made
before each timing) as the all-reduce of --zero 0 and as the reduce-scatter of --zero 1, 2:
the pipelined ring in float32, then comm/compress.py's exchange in each wire dtype. Medians of
--trials. Compression sends half the bytes and spends extra time casting; it wins where sending
the bytes it saves takes longer than that extra time: on links slower than
saved bytes / extra seconds, printed per case.
"""

import argparse
import json
import sys
import time

import numpy as np
from mpi4py import MPI

from mpitrain.comm import traffic
from mpitrain.comm.allreduce import allreduce_schedule, shard_reduce_schedule
from mpitrain.comm.compress import CompressedSum, wire_dtype
from mpitrain.comm.ring import chunk_bounds, complete


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=64.0, help="bucket size in MiB of float32 (default 64)")
    parser.add_argument("--trials", type=int, default=7, help="timings per case (default 7)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD.Dup()
    n = int(args.mb * (1 << 20)) // 4
    source = np.random.default_rng(comm.rank).standard_normal(n).astype(np.float32) * 1e-3
    buf = np.empty_like(source)
    chunks = chunk_bounds(n, comm.size)
    cases = {("float32", "all-reduce"): lambda: allreduce_schedule(buf, comm, "ring"),
             ("float32", "reduce-scatter"): lambda: shard_reduce_schedule(buf, comm, "ring", chunks)}
    wires = ["float16"]
    try:
        wire_dtype("bfloat16")
        wires.append("bfloat16")
    except Exception:  # ml_dtypes absent: the table says so by leaving the row out
        pass
    for wire in wires:
        summer = CompressedSum(wire_dtype(wire))
        cases[(wire, "all-reduce")] = lambda summer=summer: summer.schedule(buf, comm, chunks, True)
        cases[(wire, "reduce-scatter")] = lambda summer=summer: summer.schedule(buf, comm, chunks, False)
    results = {}
    for (wire, kind), make in cases.items():
        times, sent = [], 0
        for trial in range(args.trials + 1):
            buf[...] = source
            comm.Barrier()
            before, started = traffic.sent(), time.perf_counter()
            complete(make())
            elapsed = comm.allreduce(time.perf_counter() - started, op=MPI.MAX)
            sent = traffic.sent() - before
            if trial:  # the first allocates the exchange's buffers
                times.append(elapsed)
        results[(wire, kind)] = (float(np.median(times)), comm.allreduce(sent, op=MPI.MAX))
    if comm.rank != 0:
        return
    command = " ".join(["mpirun", "-n", str(comm.size), "python", *sys.argv])
    print(f"# {command}")
    print(f"# world {comm.size}, bucket {args.mb} MiB float32, median of {args.trials}; numpy {np.__version__}")
    print(f"{'wire dtype':<10} {'sum':<15} {'ms':>8} {'MB sent':>8} {'vs float32':>10} {'wins below (GB/s)':>18}")
    rows = []
    for (wire, kind), (seconds, sent) in results.items():
        base_seconds, base_sent = results[("float32", kind)]
        extra = seconds - base_seconds
        crossover = (base_sent - sent) / extra / 1e9 if wire != "float32" and extra > 0 else None
        rows.append({"wire": wire, "sum": kind, "ms": seconds * 1e3, "sent_bytes": sent,
                     "ratio": seconds / base_seconds, "wins_below_gb_per_s": crossover})
        shown = "-" if crossover is None else f"{crossover:.2f}"
        print(f"{wire:<10} {kind:<15} {seconds * 1e3:>8.1f} {sent / 1e6:>8.1f} {seconds / base_seconds:>10.2f} {shown:>18}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"command": command, "world_size": comm.size, "mb": args.mb, "rows": rows}, out, indent=1)


if __name__ == "__main__":
    main()
