"""Cost of --trace: the reference model on 2 ranks and --tp 2 --pp 2 on 4 ranks, traced and not,
in one run.

    mpirun -n 4 python benchmarks/trace_overhead.py
    mpirun -n 4 python benchmarks/trace_overhead.py --trials 5 --json trace.json

The reference MLP (784-1024-10, ReLU, Adam, float32, synthetic data, 128 samples per data-parallel
rank per step) trained by `mpitrain.train.train` for two epochs of --steps steps: data parallel on
ranks 0-1 (ranks 2-3 sleep meanwhile), then --tp 2 --pp 2 --micro-batches 4 on all four ranks.
Samples/s is that of the second epoch, from train()'s own record; traced and untraced runs
alternate over --trials trials and the medians are compared. Traced runs trace every step (the
file is written after the timed epochs). Since run-to-run noise on a shared machine can exceed the
effect, the table also gives an estimate that noise does not move: the busiest rank's events per
step times the measured cost of one event, over the untraced step time.
"""

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
import tempfile
import time
import timeit

import numpy as np
from mpi4py import MPI

from mpitrain.config import TrainConfig, validate
from mpitrain.trace import Tracer
from mpitrain.train import train

CASES = (("dp 2 ranks", 2, {}), ("tp 2 x pp 2, 4 ranks", 4, {"tp": 2, "pp": 2, "micro_batches": 4}))


def versions() -> dict:
    import mpi4py

    return {"mpi": MPI.Get_library_version().splitlines()[0].strip(), "mpi4py": mpi4py.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0]}


def idle_until_done(comm: MPI.Intracomm) -> None:
    """Ranks outside a case sleep (not spin in MPI) until it ends: a small machine needs their cores."""
    done = comm.Ibarrier()
    while not done.Test():
        time.sleep(0.01)


def event_seconds() -> float:
    """Seconds one recorded span costs: the clock read and the append (best of 5 x 20,000)."""
    tracer = Tracer()
    tracer.active = tracer.recording = True

    def record():
        started = tracer.now()
        tracer.span("compute", "forward 1", started, layer=1, micro=0)
    seconds = min(timeit.repeat(record, number=20_000, repeat=5)) / 20_000
    return seconds


EVENT_S = event_seconds()


def busiest_rank_events_per_step(path: str, steps: int) -> float:
    with open(path) as handle:
        events = json.load(handle)["traceEvents"]
    per_rank = {}
    for e in events:
        if e["ph"] in ("s", "f") or (e["ph"] == "X" and e["args"]["step"] is not None):
            per_rank[e["pid"]] = per_rank.get(e["pid"], 0) + 1
    return max(per_rank.values()) / steps


def measure(args, world: MPI.Intracomm, ranks: int, overrides: dict, folder: str) -> dict | None:
    member = world.rank < ranks
    comm = world.Split(0 if member else MPI.UNDEFINED, world.rank)
    result = None
    if member:
        dp = ranks // (overrides.get("tp", 1) * overrides.get("pp", 1))
        base = validate(dataclasses.replace(
            TrainConfig(), model=args.model, batch_size=128 * dp, device="cpu", progress=False, epochs=2,
            synth_samples=128 * dp * args.steps * 10 // 9 + 1, val_fraction=0.1, seed=0, **overrides))
        speeds = {False: [], True: []}
        for trial in range(args.trials):
            # Alternate which goes first, so that neither always inherits the other's leftovers.
            for traced in ((False, True) if trial % 2 == 0 else (True, False)):
                config = dataclasses.replace(base, trace=os.path.join(folder, "t.json") if traced else None)
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    speeds[traced].append(train(config, comm).history[-1]["samples_per_s"])
        off, on = float(np.median(speeds[False])), float(np.median(speeds[True]))
        events = busiest_rank_events_per_step(os.path.join(folder, "t.json"), 2 * args.steps)
        step_s = base.batch_size / off
        result = {"untraced_samples_per_s": off, "traced_samples_per_s": on, "overhead_percent": 100 * (off - on) / off,
                  "trials": {"untraced": speeds[False], "traced": speeds[True]},
                  "events_per_step": events, "event_us": EVENT_S * 1e6,
                  "estimated_percent": 100 * events * EVENT_S / step_s}
        comm.Free()
    idle_until_done(world)
    return world.bcast(result, root=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3, help="alternating traced/untraced runs per case")
    parser.add_argument("--steps", type=int, default=20, help="steps per epoch")
    parser.add_argument("--model", default="784-1024-10")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args()
    world = MPI.COMM_WORLD.Dup()
    folder = world.bcast(tempfile.mkdtemp() if world.rank == 0 else None, root=0)
    report = {"command": " ".join(sys.argv), "world_size": world.size, "versions": versions(), "cases": {}}
    for name, ranks, overrides in CASES:
        if world.size >= ranks:
            report["cases"][name] = measure(args, world, ranks, overrides, folder)
    if world.rank == 0:
        print(f"{report['command']}  world {world.size}  {report['versions']}")
        print(f"{'case':<24} {'untraced':>12} {'traced':>12} {'overhead':>9}   {'events/step':>11} "
              f"{'us/event':>8} {'estimate':>8}")
        for name, row in report["cases"].items():
            print(f"{name:<24} {row['untraced_samples_per_s']:>10.0f}/s {row['traced_samples_per_s']:>10.0f}/s "
                  f"{row['overhead_percent']:>8.1f}%   {row['events_per_step']:>11.0f} {row['event_us']:>8.2f} "
                  f"{row['estimated_percent']:>7.2f}%")
        if args.json:
            with open(args.json, "w") as out:
                json.dump(report, out, indent=1)


if __name__ == "__main__":
    main()
