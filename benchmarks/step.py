"""One training step against its two necessary parts, in one process: the GEMMs alone and the
optimizer update alone.

    python benchmarks/step.py                                  # 784-1024-10, 1 BLAS thread
    python benchmarks/step.py --model 784-4096-4096-10 --repeats 20
    python benchmarks/step.py --threads 2 --json step.json

A step is the loop's own work on one rank (GridStrategy.forward_backward + update: forward,
softmax cross-entropy, backward, Adam) on a batch held in memory. Its GEMMs are the same matrix
products on arrays of the same shapes, with out= (forward X W per layer; backward dW = X^T dY per
layer and dX = dY W^T for every layer but the first). The update is Adam.step on the model's flat
buffers (block by block, see mpitrain/optim.py); "whole-array update" is the same Adam as one
pass per operation over whole arrays (the bare loop's, benchmarks/train_throughput.py), what the
update cost before it ran in blocks. "gemms then update" runs the two back to back, so each
finds the caches as the other left them, as in a step. The five are timed in turn, --repeats
times each round, over --rounds rounds; the medians and the ratios of the step to them are printed.
"""

import argparse
import dataclasses
import json
import math
import time

import numpy as np
from mpi4py import MPI
from threadpoolctl import threadpool_limits

from mpitrain.backend import select_backend
from mpitrain.config import TrainConfig, validate
from mpitrain.nn.model import parse_widths
from mpitrain.optim import Adam
from mpitrain.parallel.strategy import GridStrategy


def timed(run, repeats: int) -> float:
    """Median seconds of one call, over `repeats` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="784-1024-10")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    parser.add_argument("--repeats", type=int, default=50, help="calls per measurement (default 50)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the three measurements (default 5)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    widths = parse_widths(args.model)
    config = validate(dataclasses.replace(TrainConfig(), model=args.model, batch_size=args.batch, device="cpu",
                                          progress=False))
    comm = MPI.COMM_SELF.Dup()
    strategy = GridStrategy(config, comm, widths, select_backend("cpu", comm))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, widths[0]), dtype=np.float32)
    y = rng.integers(0, widths[-1], args.batch)

    def step():
        strategy.forward_backward(x, y)
        strategy.update(1e-3)

    inputs = [x] + [np.ones((args.batch, w), np.float32) for w in widths[1:-1]]
    outputs = [np.empty((args.batch, w), np.float32) for w in widths[1:]]
    weights = [np.ones((a, b), np.float32) for a, b in zip(widths[:-1], widths[1:])]
    weight_grads = [np.empty_like(w) for w in weights]
    input_grads = [np.empty((args.batch, w), np.float32) for w in widths[:-1]]

    def gemms():
        for a, w, out in zip(inputs, weights, outputs):
            np.matmul(a, w, out=out)
        for i in reversed(range(len(weights))):
            np.matmul(inputs[i].T, outputs[i], out=weight_grads[i])
            if i:
                np.matmul(outputs[i], weights[i].T, out=input_grads[i])

    params, grads = strategy.model.params.copy(), strategy.model.grads.copy()
    adam = Adam(params, grads, lr=1e-3)

    def update():
        adam.step()

    m, v, work = (np.zeros_like(params) for _ in range(3))
    t = [0]

    def whole_array_update():
        t[0] += 1
        np.multiply(m, 0.9, out=m)
        np.multiply(grads, 0.1, out=work)
        np.add(m, work, out=m)
        np.multiply(v, 0.999, out=v)
        np.multiply(grads, grads, out=work)
        np.multiply(work, 0.001, out=work)
        np.add(v, work, out=v)
        np.sqrt(v, out=work)
        np.multiply(work, 1 / math.sqrt(1 - 0.999 ** t[0]), out=work)
        np.add(work, 1e-8, out=work)
        np.divide(m, work, out=work)
        np.multiply(work, 1e-3 / (1 - 0.9 ** t[0]), out=work)
        np.subtract(params, work, out=params)

    def gemms_then_update():
        gemms()
        update()

    runs = {"step": step, "gemms": gemms, "update": update, "whole-array update": whole_array_update,
            "gemms then update": gemms_then_update}
    rounds = {name: [] for name in runs}
    with threadpool_limits(args.threads):
        for run in runs.values():
            run()  # the first call allocates what later ones reuse
        for _ in range(args.rounds):
            for name, run in runs.items():
                rounds[name].append(timed(run, args.repeats))
    median = {name: float(np.median(values)) for name, values in rounds.items()}
    ratio = median["step"] / (median["gemms"] + median["update"])
    whole_ratio = median["step"] / (median["gemms"] + median["whole-array update"])
    alternated_ratio = median["step"] / median["gemms then update"]
    print(f"# python benchmarks/step.py --model {args.model} --batch {args.batch} --threads {args.threads}; "
          f"numpy {np.__version__}; median of {args.rounds} rounds of {args.repeats}")
    for name, value in median.items():
        print(f"{name:<20} {value * 1e3:8.2f} ms   rounds: " + " ".join(f"{v * 1e3:.2f}" for v in rounds[name]))
    print(f"step / (gemms + update) = {ratio:.3f}; step / (gemms + whole-array update) = {whole_ratio:.3f}; "
          f"step / (gemms then update, one after the other) = {alternated_ratio:.3f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"model": args.model, "batch": args.batch, "threads": args.threads, "ms": median,
                       "rounds": rounds, "ratio": ratio, "ratio_whole_array_update": whole_ratio,
                       "ratio_gemms_then_update": alternated_ratio}, out, indent=1)


if __name__ == "__main__":
    main()
