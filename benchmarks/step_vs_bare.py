"""mpitrain's data-parallel step against the bare NumPy + mpi4py loop's, alternated in one process.

    mpirun -n 2 python benchmarks/step_vs_bare.py
    mpirun -n 4 python benchmarks/step_vs_bare.py --rounds 9 --json s4.json

benchmarks/train_throughput.py runs whole trainings one after the other, so a shared machine
that changes speed between two runs moves their ratio. Here both steps live in the same processes
and take turns every --steps steps over --rounds rounds, on one batch held in memory (the
reference model 784-1024-10, Adam, float32, --per-rank rows per rank, one BLAS thread): the bare
step (train_throughput.bare_step: forward, loss, backward, one Allreduce, whole-array Adam) and
mpitrain's (GridStrategy.forward_backward, the loop's NaN/Inf check and flag agreement, update)
for each configuration. Printed: each one's median ms per step (the slowest rank's) and the
median over rounds of the bare step's time over its own (above 1: mpitrain is faster).
"""

import argparse
import dataclasses
import json
import sys
import time

import numpy as np
from mpi4py import MPI
from threadpoolctl import threadpool_limits

from mpitrain.backend import select_backend, step_finite
from mpitrain.config import TrainConfig, validate
from mpitrain.nn.model import parse_widths
from mpitrain.parallel.strategy import GridStrategy
from train_throughput import bare_step

CONFIGS = {  # name: (allreduce, overlap, zero)
    "auto overlap (default)": ("auto", True, 0),
    "ring overlap": ("ring", True, 0),
    "mpi no-overlap": ("mpi", False, 0),
    "auto overlap zero 1": ("auto", True, 1),
    "hier overlap zero 1": ("hier", True, 1),
}


def mpitrain_step(model: str, comm: MPI.Intracomm, per_rank: int, allreduce: str, overlap: bool, zero: int):
    """step(x, y, t): the training loop's work on one batch, as mpitrain/train.py runs it."""
    config = validate(dataclasses.replace(TrainConfig(), model=model, batch_size=per_rank * comm.size, device="cpu",
                                          progress=False, allreduce=allreduce, overlap=overlap, zero=zero))
    strategy = GridStrategy(config, comm.Dup(), parse_widths(model), select_backend("cpu", comm))
    flags = np.zeros(3, np.uint8)

    def step(x, y, t):
        loss = strategy.forward_backward(x, y)
        flags[0] = not step_finite(loss, strategy.grads_to_check)
        comm.Allreduce(MPI.IN_PLACE, flags, op=MPI.MAX)  # the loop's per-step agreement
        strategy.update(1e-3, not flags[0])

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="784-1024-10", help="MLP widths (default 784-1024-10)")
    parser.add_argument("--per-rank", type=int, default=128, help="rows per rank per step (default 128)")
    parser.add_argument("--steps", type=int, default=50, help="steps per turn (default 50)")
    parser.add_argument("--rounds", type=int, default=7, help="turns of every step (default 7)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    widths = parse_widths(args.model)
    rng = np.random.default_rng(comm.rank)
    x = rng.standard_normal((args.per_rank, widths[0]), dtype=np.float32)
    y = rng.integers(0, widths[-1], args.per_rank)
    steps = {"bare": bare_step(widths, comm, args.per_rank, rng)}
    steps.update({name: mpitrain_step(args.model, comm, args.per_rank, *setting) for name, setting in CONFIGS.items()})
    ms = {name: [] for name in steps}
    t = 0
    with threadpool_limits(limits=1, user_api="blas"):
        for step in steps.values():
            for _ in range(3):  # the first steps allocate what the others reuse
                t += 1
                step(x, y, t)
        for _ in range(args.rounds):
            for name, step in steps.items():
                comm.Barrier()
                started = time.perf_counter()
                for _ in range(args.steps):
                    t += 1
                    step(x, y, t)
                ms[name].append(comm.allreduce((time.perf_counter() - started) / args.steps * 1e3, op=MPI.MAX))
    if comm.rank != 0:
        return
    bare = np.array(ms["bare"])
    speedup = {name: float(np.median(bare / np.array(values))) for name, values in ms.items()}
    command = " ".join(["mpirun", "-n", str(comm.size), "python", *sys.argv])
    print(f"# {command}")
    print(f"# world {comm.size}, model {args.model}, Adam, float32, {args.per_rank} rows/rank, 1 BLAS thread, "
          f"{args.steps} steps a turn, median of {args.rounds} rounds")
    print(f"{'step':<26} {'ms':>7} {'bare / this':>12}   rounds (ms)")
    for name, values in ms.items():
        print(f"{name:<26} {np.median(values):>7.2f} {speedup[name]:>12.3f}   " + " ".join(f"{v:.2f}" for v in values))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"command": command, "world_size": comm.size, "model": args.model, "per_rank": args.per_rank,
                       "ms": ms, "bare_over_this": speedup}, out, indent=1)


if __name__ == "__main__":
    main()
