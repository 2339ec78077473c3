"""Sharded optimizer state (--zero) and gradient compression (--grad-dtype) against plain data
parallelism and one process, in one run.

    mpirun -n 2 python benchmarks/zero.py
    mpirun -n 4 python benchmarks/zero.py --json p4.json
    mpirun -n 2 python benchmarks/zero.py --model 784-1024-10 --steps 60

Every configuration trains the same global batch (default 128) of synthetic data with Adam in
float32 through `mpitrain.train.train`; samples/s is measured over the second epoch (the first warms
up), configurations alternate over --trials runs and the median is reported with its ratio to
plain data parallelism (--zero 0), and "paired", the median over trials of each run's ratio to
the --zero 0 run of the same trial. "one process" is rank 0 training alone on COMM_SELF with as
many BLAS threads as the job has ranks, at most the cores it may use (the other ranks sleep): the
best one machine does without MPI. Bytes sent per step and memory per rank are the metrics record's (busiest rank).
"""

import argparse
import contextlib
import dataclasses
import io
import json
import math
import sys
import time

import numpy as np
from mpi4py import MPI

from mpitrain.backend import available_cores, settle_threads
from mpitrain.config import TrainConfig, validate
from mpitrain.train import train

CONFIGS = {  # name: config overrides; "world" False runs one process
    "one process": dict(world=False),
    "zero 0": dict(zero=0),
    "zero 1": dict(zero=1),
    "zero 2": dict(zero=2),
    "zero 1 hier": dict(zero=1, allreduce="hier"),
    "zero 1 float16": dict(zero=1, grad_dtype="float16"),
    "zero 1 bfloat16": dict(zero=1, grad_dtype="bfloat16"),
    "zero 0 bfloat16": dict(zero=0, grad_dtype="bfloat16"),
}
FIELDS = ("sent_bytes_per_step", "param_bytes_per_rank", "grad_bytes_per_rank", "optimizer_bytes_per_rank")


def sleep_until_all_arrive(comm: MPI.Intracomm) -> None:
    """A barrier that sleeps instead of spinning, so a waiting rank leaves its core to the worker."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.005)


def measure(base: TrainConfig, overrides: dict, comm: MPI.Intracomm) -> dict:
    """(samples/s, record fields) of one run, on every rank."""
    settings = {k: v for k, v in overrides.items() if k != "world"}
    config = dataclasses.replace(base, **settings)
    record = None
    if overrides.get("world", True):
        with contextlib.redirect_stdout(io.StringIO()):
            record = train(config, comm).history[-1]
    else:
        if comm.rank == 0:
            with contextlib.redirect_stdout(io.StringIO()):
                threads = min(comm.size, available_cores())
                record = train(dataclasses.replace(config, threads=threads), MPI.COMM_SELF).history[-1]
            settle_threads()  # its idle BLAS workers spin on for 0.1 s, on the cores of the run after it
        sleep_until_all_arrive(comm)
        record = comm.bcast(record, root=0)
    return {"samples_per_s": record["samples_per_s"], **{field: record[field] for field in FIELDS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="784-4096-4096-10", help="MLP widths (default 784-4096-4096-10)")
    parser.add_argument("--batch", type=int, default=128, help="global batch (default 128)")
    parser.add_argument("--steps", type=int, default=16, help="steps per epoch (default 16)")
    parser.add_argument("--trials", type=int, default=3, help="runs of every configuration (default 3)")
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS), help="run only these configurations")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD.Dup()
    names = args.only or list(CONFIGS)
    samples = math.ceil(args.steps * args.batch / 0.9) + comm.size
    base = validate(dataclasses.replace(TrainConfig(), model=args.model, batch_size=args.batch, epochs=2,
                                        synth_samples=samples, device="cpu", progress=False))
    measure(dataclasses.replace(base, steps=1), {}, comm)  # writes the data set once

    runs = {name: [] for name in names}
    for _ in range(args.trials):
        for name in names:
            runs[name].append(measure(base, CONFIGS[name], comm))
    median = {name: float(np.median([r["samples_per_s"] for r in values])) for name, values in runs.items()}
    if comm.rank != 0:
        return
    import mpi4py

    reference_name = "zero 0" if "zero 0" in median else next(iter(median))
    reference = median[reference_name]

    def rates(name):
        return np.array([r["samples_per_s"] for r in runs[name]])

    # Each trial's ratio to the reference run of the same trial: what drift between trials moves least.
    paired = {name: float(np.median(rates(name) / rates(reference_name))) for name in median}
    command = " ".join(["mpirun", "-n", str(comm.size), "python", *sys.argv])
    print(f"# {command}")
    print(f"# world {comm.size}, model {args.model}, Adam, float32, global batch {args.batch}, {args.steps} steps/epoch; "
          f"{MPI.Get_library_version().splitlines()[0].strip()}, mpi4py {mpi4py.__version__}, "
          f"numpy {np.__version__}; median of {args.trials}")
    print(f"{'configuration':<18} {'samples/s':>10} {'vs ' + reference_name:>9} {'paired':>7} {'MB sent/step':>12} "
          f"{'param MB':>9} {'grad MB':>8} {'optim MB':>9}   runs")
    for name, value in median.items():
        last = runs[name][-1]
        print(f"{name:<18} {value:>10.0f} {value / reference:>9.3f} {paired[name]:>7.3f} "
              f"{last['sent_bytes_per_step'] / 1e6:>12.1f} "
              f"{last['param_bytes_per_rank'] / 1e6:>9.1f} {last['grad_bytes_per_rank'] / 1e6:>8.1f} "
              f"{last['optimizer_bytes_per_rank'] / 1e6:>9.1f}   "
              + " ".join(f"{r['samples_per_s']:.0f}" for r in runs[name]))
    if "one process" in median and "zero 1" in median:
        pairs = float(np.median(rates("zero 1") / rates("one process")))
        print(f"zero 1 / one process = {median['zero 1'] / median['one process']:.3f} (paired {pairs:.3f})")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"command": command, "world_size": comm.size, "model": args.model, "batch": args.batch,
                       "steps_per_epoch": args.steps, "trials": args.trials, "samples_per_s": median,
                       "paired_vs_" + reference_name.replace(" ", "_"): paired, "runs": runs}, out, indent=1)


if __name__ == "__main__":
    main()
