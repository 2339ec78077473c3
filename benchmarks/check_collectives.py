"""Cost of --check-collectives: every collective with and without its fingerprint exchange, and the
training step of the reference model with the checks off and on, in one run.

    mpirun -n 2 python benchmarks/check_collectives.py
    mpirun -n 4 python benchmarks/check_collectives.py --json check.json

Collectives: ring all-reduce of float32 buffers from 64 B to 4 MiB, time per call (median of
--trials trials of back-to-back calls, slowest rank), checks off and on alternating. Training:
784-1024-10 (ReLU, Adam, float32, global batch 128 per rank, synthetic data) for --steps steps,
samples/s of the second epoch from train()'s own record, off and on alternating over --trials runs.
The checks are switched with fingerprint.enable(); off, a call site pays one attribute test.
"""

import argparse
import contextlib
import dataclasses
import io
import json
import sys
import time

import numpy as np
from mpi4py import MPI

from mpitrain.comm import allreduce, fingerprint
from mpitrain.config import TrainConfig, validate
from mpitrain.train import train

WARMUP_CALLS = 5


def versions() -> dict:
    import mpi4py

    return {"mpi": MPI.Get_library_version().splitlines()[0].strip(), "mpi4py": mpi4py.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0]}


def time_calls(buf: np.ndarray, comm: MPI.Intracomm, trial_s: float) -> float:
    """Seconds per ring all-reduce over back-to-back calls (the count from rank 0's warm-up, agreed:
    every rank must make the same calls)."""
    started = time.perf_counter()
    for _ in range(WARMUP_CALLS):
        allreduce(buf, comm, "ring")
    calls = comm.bcast(max(1, int(trial_s / ((time.perf_counter() - started) / WARMUP_CALLS))), root=0)
    comm.Barrier()
    started = time.perf_counter()
    for _ in range(calls):
        allreduce(buf, comm, "ring")
    return comm.allreduce((time.perf_counter() - started) / calls, op=MPI.MAX)


def collectives(args, comm: MPI.Intracomm) -> list[dict]:
    rows = []
    nbytes = 64
    while nbytes <= args.max_bytes:
        buf = np.zeros(nbytes // 4, dtype=np.float32)  # zeros: summing in place never overflows
        times = {False: [], True: []}
        for _ in range(args.trials):
            for on in (False, True):
                fingerprint.enable(on)
                times[on].append(time_calls(buf, comm, args.trial_s))
        off, on = np.median(times[False]), np.median(times[True])
        rows.append({"bytes": nbytes, "off_us": off * 1e6, "on_us": on * 1e6, "overhead_us": (on - off) * 1e6,
                     "ratio": on / off})
        nbytes *= 16
    fingerprint.enable(False)
    return rows


def training(args, comm: MPI.Intracomm) -> dict:
    base = dataclasses.replace(TrainConfig(), model=args.model, batch_size=128 * comm.size, device="cpu",
                               progress=False, synth_samples=128 * comm.size * args.steps * 10 // 9 + 1,
                               epochs=2, val_fraction=0.1, seed=0)
    samples = {False: [], True: []}
    for _ in range(args.trials):
        for on in (False, True):
            fingerprint.enable(on)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                result = train(validate(dataclasses.replace(base, check_collectives=on)), comm)
            samples[on].append(result.history[-1]["samples_per_s"])
    fingerprint.enable(False)
    off, on = float(np.median(samples[False])), float(np.median(samples[True]))
    return {"model": args.model, "steps_per_epoch": args.steps, "off_samples_per_s": off, "on_samples_per_s": on,
            "slowdown_percent": 100 * (off - on) / off}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-bytes", type=int, default=4 << 20, help="largest buffer (default 4 MiB)")
    parser.add_argument("--trials", type=int, default=5, help="alternating trials per measurement")
    parser.add_argument("--trial-s", type=float, default=0.05, help="seconds of back-to-back calls per trial")
    parser.add_argument("--model", default="784-1024-10")
    parser.add_argument("--steps", type=int, default=30, help="steps per epoch of the training runs")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD.Dup()
    report = {"command": " ".join(sys.argv), "world_size": comm.size, "versions": versions(),
              "collectives": collectives(args, comm), "training": training(args, comm)}
    if comm.rank == 0:
        print(f"{report['command']}  world {comm.size}  {report['versions']}")
        print(f"{'bytes':>10} {'off us':>10} {'on us':>10} {'+us':>8} {'on/off':>7}")
        for row in report["collectives"]:
            print(f"{row['bytes']:>10} {row['off_us']:>10.1f} {row['on_us']:>10.1f} {row['overhead_us']:>8.1f} "
                  f"{row['ratio']:>7.2f}")
        t = report["training"]
        print(f"training {t['model']}: {t['off_samples_per_s']:.0f} samples/s off, {t['on_samples_per_s']:.0f} on "
              f"({t['slowdown_percent']:+.1f} % slower with the checks)")
        if args.json:
            with open(args.json, "w") as out:
                json.dump(report, out, indent=1)


if __name__ == "__main__":
    main()
