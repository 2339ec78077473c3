"""The GPU step: samples/s, the step split into compute, staging and MPI, and the card's matmul rate.

    mpirun -n 1 python benchmarks/gpu.py                      # one rank on GPU 0
    mpirun -n 2 python benchmarks/gpu.py --json gpu2.json     # two ranks (sharing one GPU if only one)
    python benchmarks/gpu.py --device cpu --steps 3           # the same measurements with NumPy (a dry run)

For each model (default: the reference MLP 784-1024-10 and the wide 784-8192-8192-10, ReLU,
Adam, per-rank batch 1024) and dtype (float32 by default; the step computes in float32 or float64):
- `step`: the training step as `mpitrain train` runs it (GridStrategy: forward, backward with the
  bucketed gradient all-reduce overlapped, Adam), median seconds over --steps timed steps, each
  ended by a device synchronize; samples/s counts every rank's rows.
- `compute`: the same step on this rank alone (a world-1 strategy: no message, no staging).
- `staging`: one device-to-host and one host-to-device copy of the whole gradient through the
  pinned buffer the all-reduce uses (0 with NumPy or a CUDA-aware MPI, which stage nothing).
- `mpi`: the all-reduce of the gradient's size over the ranks on host memory (`--allreduce`).
- `matmuls`: the step's GEMMs alone (forward Y = XW, backward dW = X^T dY and dX = dY W^T; the
  first layer has no dX), timed back to back at the same shapes, and the rate they reach in
  TFLOP/s (2·m·n·k flops each), measured in the same run: the floor a step is compared against.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpitrain import backend as backends  # noqa: E402
from mpitrain.comm.allreduce import allreduce  # noqa: E402
from mpitrain.config import TrainConfig, validate  # noqa: E402
from mpitrain.parallel.strategy import GridStrategy  # noqa: E402


def timed(run, sync, repeats: int) -> float:
    """Median seconds of run() over `repeats` calls, each ended by sync()."""
    run()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def gemm_shapes(widths: list[int], batch: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of every GEMM of one step: per layer XW (B, in)x(in, out), X^T dY (in, B)x(B, out)
    and, except on the first layer, dY W^T (B, out)x(out, in)."""
    shapes = []
    for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        shapes += [(batch, fan_in, fan_out), (fan_in, batch, fan_out)]
        if index:
            shapes.append((batch, fan_out, fan_in))
    return shapes


def matmuls(xp, shapes, dtype, sync, repeats: int) -> tuple[float, float]:
    """(seconds for all the GEMMs once, TFLOP/s they reach), operands allocated beforehand."""
    operands = [(xp.ones((m, k), dtype=dtype), xp.ones((k, n), dtype=dtype), xp.empty((m, n), dtype=dtype))
                for m, k, n in shapes]

    def run():
        for a, b, out in operands:
            xp.matmul(a, b, out=out)

    seconds = timed(run, sync, repeats)
    flops = sum(2 * m * k * n for m, k, n in shapes)
    return seconds, flops / seconds / 1e12


def measure(args, comm: MPI.Intracomm, model: str, dtype: str) -> dict:
    widths = [int(w) for w in model.split("-")]
    config = validate(TrainConfig(model=model, dtype=dtype, device=args.device, batch_size=args.batch_size * comm.size,
                                  allreduce=args.allreduce, progress=False))
    backend = backends.select_backend(args.device, comm)
    xp, sync = backend.xp, backend.synchronize
    rng = np.random.default_rng(comm.rank)
    x = xp.asarray(rng.standard_normal((args.batch_size, widths[0])), dtype=np.dtype(dtype))
    y = xp.asarray(rng.integers(0, widths[-1], args.batch_size))

    def step_on(strategy):
        def run():
            strategy.forward_backward(x, y)
            strategy.update(1e-4)
        return run

    row = {"model": model, "dtype": dtype, "ranks": comm.size, "batch_per_rank": args.batch_size}
    world = GridStrategy(config, comm, widths, backend)
    row["step_s"] = timed(step_on(world), sync, args.steps)
    world.close()
    alone = GridStrategy(validate(TrainConfig(**{**config.__dict__, "batch_size": args.batch_size})), MPI.COMM_SELF,
                         widths, backend)
    row["compute_s"] = timed(step_on(alone), sync, args.steps)
    grads = alone.model.grads
    if isinstance(grads, np.ndarray) or comm.size == 1 or backends.cuda_aware_mpi():
        row["staging_s"] = 0.0
    else:
        def stage():
            with backends.staged_on_host(grads):
                pass
        row["staging_s"] = timed(stage, sync, args.steps)
    host = np.zeros(grads.size, dtype=grads.dtype)
    row["mpi_s"] = timed(lambda: allreduce(host, comm, args.allreduce), comm.Barrier, args.steps) if comm.size > 1 else 0.0
    alone.close()
    row["matmuls_s"], row["matmul_tflops"] = matmuls(xp, gemm_shapes(widths, args.batch_size), np.dtype(dtype), sync,
                                                     args.steps)
    row["samples_per_s"] = args.batch_size * comm.size / row["step_s"]
    row["step_over_matmuls"] = row["compute_s"] / row["matmuls_s"]
    return row


def versions(device: str) -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__, "mpi": MPI.Get_library_version().splitlines()[0]}
    if device != "cpu":
        import cupy
        out["cupy"] = cupy.__version__
        runtime = cupy.cuda.runtime.runtimeGetVersion()
        out["cuda_runtime"] = f"{runtime // 1000}.{runtime % 1000 // 10}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="gpu (CuPy, default) or cpu (NumPy)")
    parser.add_argument("--models", default="784-1024-10,784-8192-8192-10", help="comma-separated MLP widths")
    parser.add_argument("--dtypes", default="float32", help="comma-separated step dtypes: float32, float64")
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per rank per step (default 1024)")
    parser.add_argument("--steps", type=int, default=20, help="timed repetitions of each measurement (default 20)")
    parser.add_argument("--allreduce", default="auto", help="gradient all-reduce algorithm (default auto)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows and the run's context as JSON")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD.Dup()
    context = {"command": " ".join(["python", *sys.argv]), "world_size": comm.size, **versions(args.device),
               "device": backends.select_backend(args.device, comm).describe()}
    rows = [measure(args, comm, model, dtype) for model in args.models.split(",") for dtype in args.dtypes.split(",")]
    if comm.rank == 0:
        print(f"{context['command']}  world {comm.size}  {context['device']}")
        print(" | ".join(f"{k} {v}" for k, v in context.items() if k not in ("command", "device", "world_size")))
        print("| model | dtype | samples/s | step ms | compute ms | staging ms | MPI ms | matmuls ms | TFLOP/s "
              "| compute / matmuls |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['model']} | {r['dtype']} | {r['samples_per_s']:.0f} | {r['step_s'] * 1e3:.2f} | "
                  f"{r['compute_s'] * 1e3:.2f} | {r['staging_s'] * 1e3:.2f} | {r['mpi_s'] * 1e3:.2f} | "
                  f"{r['matmuls_s'] * 1e3:.2f} | {r['matmul_tflops']:.2f} | {r['step_over_matmuls']:.2f} |")
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"context": context, "rows": rows}, handle, indent=1)
    comm.Free()


if __name__ == "__main__":
    main()
