"""Samples/s of ring all-reduce data parallelism, sync parameter server and async parameter server.

    mpirun -n 4 python benchmarks/ps.py --straggler 1:100 --json ps.json   # the README's table
    mpirun -n 2 python benchmarks/ps.py --steps 10 --repeat 1              # a quick look

Every variant trains the reference 784-1024-10 MLP (Adam, float32, global batch 128) for the same
number of samples on the CPU: all-reduce on all P ranks, the parameter server on P - 1 workers and
1 server. Then again with one rank slowed down by a sleep before each backward pass (`--straggler
RANK:MS`, a benchmark-only delay patched in here, not part of mpitrain): sync and all-reduce wait for
it every step, async lets the other workers compute its share. samples/s = samples / wall time of
the whole train() call (setup included; no validation), best of --repeat runs.
"""

import argparse
import contextlib
import dataclasses
import io
import json
import platform
import sys
import time

import mpi4py
import numpy as np
from mpi4py import MPI

from mpitrain.comm import world
from mpitrain.config import TrainConfig, validate
from mpitrain.nn.model import Model
from mpitrain.data.rank import ensure_synthetic
from mpitrain.train import train

VARIANTS = {
    "ring all-reduce": dict(sync="allreduce", allreduce="ring"),
    "sync PS": dict(sync="ps", ps_mode="sync"),
    "async PS": dict(sync="ps", ps_mode="async"),
}


def parse_straggler(text: str) -> tuple[int, float]:
    rank, _, ms = text.partition(":")
    try:
        return int(rank), float(ms)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--straggler {text!r}: expected RANK:MS, like 1:50") from None


@contextlib.contextmanager
def straggling(comm, straggler: tuple[int, float] | None):
    """On the straggler's rank, sleep MS milliseconds before every backward pass."""
    if straggler is None or comm.rank != straggler[0]:
        yield
        return
    backward = Model.backward

    def slow_backward(self, *args, **kwargs):
        time.sleep(straggler[1] / 1000)
        return backward(self, *args, **kwargs)

    Model.backward = slow_backward
    try:
        yield
    finally:
        Model.backward = backward


def measure(config: TrainConfig, comm, straggler, repeat: int) -> float:
    """Best samples/s over `repeat` runs of train(config). Collective on comm."""
    best = 0.0
    for _ in range(repeat):
        comm.Barrier()
        started = time.perf_counter()
        with straggling(comm, straggler), contextlib.redirect_stdout(io.StringIO()):
            train(dataclasses.replace(config), comm)
        seconds = comm.allreduce(time.perf_counter() - started, op=MPI.MAX)
        best = max(best, config.steps * config.batch_size / seconds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="784-1024-10")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="global-batch steps per run (default 40)")
    parser.add_argument("--samples", type=int, default=6000, help="rows of the synthetic set (default 6000)")
    parser.add_argument("--straggler", type=parse_straggler, metavar="RANK:MS",
                        help="also measure with rank RANK sleeping MS ms before each backward pass")
    parser.add_argument("--repeat", type=int, default=2, help="runs per cell; the best is kept (default 2)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args()
    comm = world()
    if comm.size < 2 or (args.straggler and not 0 <= args.straggler[0] < comm.size - 1):
        sys.exit("run under mpirun -n 2 or more; the straggler must be a worker rank (0 .. P-2)")

    config = validate(dataclasses.replace(
        TrainConfig(), model=args.model, batch_size=args.batch_size, steps=args.steps, synth_samples=args.samples,
        val_fraction=0.0, device="cpu", progress=False))
    config.data = ensure_synthetic(config, [int(w) for w in args.model.split("-")], comm)
    stragglers = [None] + ([args.straggler] if args.straggler else [])
    rows = []
    for straggler in stragglers:
        for name, variant in VARIANTS.items():
            rate = measure(dataclasses.replace(config, **variant), comm, straggler, args.repeat)
            rows.append({"variant": name, "straggler": None if straggler is None else f"{straggler[0]}:{straggler[1]:g}",
                         "samples_per_s": rate})
    if comm.rank != 0:
        return

    def rate(name, straggler):
        return next(r["samples_per_s"] for r in rows if r["variant"] == name and r["straggler"] == straggler)

    labels = [None if s is None else f"{s[0]}:{s[1]:g}" for s in stragglers]
    command = f"mpirun -n {comm.size} python " + " ".join(sys.argv)
    versions = {"python": platform.python_version(), "numpy": np.__version__, "mpi4py": mpi4py.__version__,
                "mpi": " ".join(MPI.Get_library_version().split()[:3])}
    print(f"# {command}")
    print(f"# world {comm.size} (PS: {comm.size - 1} workers + 1 server), model {args.model}, batch {args.batch_size}, "
          f"{args.steps} steps, best of {args.repeat}; {', '.join(f'{k} {v}' for k, v in versions.items())}")
    header = ["variant"] + ["samples/s" if s is None else f"samples/s, rank {s[0]} +{s[1]:g} ms/step" for s in stragglers]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in VARIANTS:
        print("| " + " | ".join([name] + [f"{rate(name, s):.0f}" for s in labels]) + " |")
    ratios = {str(s): rate("async PS", s) / rate("sync PS", s) for s in labels}
    print("async / sync: " + ", ".join(f"{r:.2f}" + ("" if s == "None" else f" with straggler {s}")
                                       for s, r in ratios.items()))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": command, "world_size": comm.size, "model": args.model, "batch_size": args.batch_size,
                       "steps": args.steps, "repeat": args.repeat, "versions": versions, "rows": rows,
                       "async_over_sync": ratios}, handle, indent=2)


if __name__ == "__main__":
    main()
