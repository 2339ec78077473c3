"""Training throughput: mpitrain against a bare NumPy + mpi4py loop of the same model, in one run.

    mpirun -n 2 python benchmarks/train_throughput.py
    mpirun -n 4 python benchmarks/train_throughput.py --json p4.json
    mpirun -n 2 python benchmarks/train_throughput.py --model 784-1024-1024-1024-10

The reference MLP (784-1024-10, ReLU, Adam, float32, 128 samples per rank, synthetic data held
in memory) trained by `mpitrain.train.train` with the gradient all-reduce as ring or MPI, with
overlap on and off (and auto, the default), with --zero 1 (auto, and hier), and by `bare`: a plain loop (index a batch, forward,
softmax cross-entropy, backward into one flat gradient buffer, one comm.Allreduce, Adam), no
framework. Samples/s is measured over the second epoch of each run (the first warms up), by
rank 0, excluding validation; configurations alternate over --trials runs and the median is
reported, with its ratio to the bare loop's median and the median of its ratios to the bare run
of the same trial ("paired": what drift of a shared machine between trials moves least).
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

from mpitrain.config import TrainConfig, validate
from mpitrain.train import train

CONFIGS = {  # name: (allreduce, overlap, zero); None runs the bare loop
    "bare": None,
    "auto overlap": ("auto", True, 0),
    "auto no-overlap": ("auto", False, 0),
    "ring overlap": ("ring", True, 0),
    "ring no-overlap": ("ring", False, 0),
    "mpi overlap": ("mpi", True, 0),
    "mpi no-overlap": ("mpi", False, 0),
    "auto overlap zero 1": ("auto", True, 1),
    "hier overlap zero 1": ("hier", True, 1),
}


# ---------------------------------------------------------------------------- the bare loop


def bare_step(widths: list[int], comm: MPI.Intracomm, per_rank: int, rng: np.random.Generator):
    """step(x, y, t) -> loss: one step of a framework-free data-parallel MLP (flat params and
    grads, forward, softmax cross-entropy, backward, one comm.Allreduce, Adam at step t)."""
    shapes = list(zip(widths[:-1], widths[1:]))
    sizes = [n_in * n_out + n_out for n_in, n_out in shapes]
    params = np.zeros(sum(sizes), np.float32)
    grads, m, v, work = (np.zeros_like(params) for _ in range(4))
    offsets = np.cumsum([0] + sizes)
    layers = []
    for (n_in, n_out), start in zip(shapes, offsets):
        bias = start + n_in * n_out
        w, b = params[start:bias].reshape(n_in, n_out), params[bias:bias + n_out]
        gw, gb = grads[start:bias].reshape(n_in, n_out), grads[bias:bias + n_out]
        w[...] = rng.normal(0, math.sqrt(2 / n_in), (n_in, n_out))
        layers.append((w, b, gw, gb))
    scale, lr, beta1, beta2, eps = 1.0 / (per_rank * comm.size), 1e-3, 0.9, 0.999, 1e-8

    def step(x, y, t):
        activations = [x]
        for i, (w, b, _, _) in enumerate(layers):
            out = activations[-1] @ w
            out += b
            if i < len(layers) - 1:
                np.maximum(out, 0, out=out)
            activations.append(out)
        logits = activations[-1]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss = -float(log_probs[np.arange(len(y)), y].sum())
        delta = np.exp(log_probs)
        delta[np.arange(len(y)), y] -= 1
        delta *= scale
        for i in reversed(range(len(layers))):
            w, _, gw, gb = layers[i]
            np.matmul(activations[i].T, delta, out=gw)
            delta.sum(axis=0, out=gb)
            if i:
                delta = (delta @ w.T) * (activations[i] > 0)
        comm.Allreduce(MPI.IN_PLACE, grads, op=MPI.SUM)
        # Adam with bias correction, in place (ufuncs with out=: the buffers belong to the enclosing scope).
        np.multiply(m, beta1, out=m)
        np.multiply(grads, 1 - beta1, out=work)
        np.add(m, work, out=m)
        np.multiply(v, beta2, out=v)
        np.multiply(grads, grads, out=work)
        np.multiply(work, 1 - beta2, out=work)
        np.add(v, work, out=v)
        np.sqrt(v, out=work)
        np.multiply(work, 1 / math.sqrt(1 - beta2**t), out=work)
        np.add(work, eps, out=work)
        np.divide(m, work, out=work)
        np.multiply(work, lr / (1 - beta1**t), out=work)
        np.subtract(params, work, out=params)
        return loss

    return step


def bare_samples_per_s(widths: list[int], comm: MPI.Intracomm, per_rank: int, rows: int, steps: int) -> float:
    """Samples/s of the bare loop (bare_step) over its second epoch of `steps` steps."""
    rng = np.random.default_rng(comm.rank)
    x_all = rng.standard_normal((rows, widths[0]), dtype=np.float32)
    y_all = rng.integers(0, widths[-1], rows)
    step = bare_step(widths, comm, per_rank, rng)
    elapsed, t = 0.0, 0
    for epoch in range(2):
        order = rng.permutation(rows)
        comm.Barrier()
        started = time.perf_counter()
        for s in range(steps):
            index = order[s * per_rank:(s + 1) * per_rank]
            t += 1
            step(x_all[index], y_all[index], t)
        elapsed = time.perf_counter() - started
    return steps * per_rank * comm.size / elapsed


# ---------------------------------------------------------------------------- mpitrain


def mpitrain_samples_per_s(base: TrainConfig, allreduce: str, overlap: bool, zero: int, comm: MPI.Intracomm) -> float:
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer's own progress lines
        result = train(dataclasses.replace(base, allreduce=allreduce, overlap=overlap, zero=zero), comm)
    return result.history[-1]["samples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="784-1024-10", help="MLP widths (default 784-1024-10)")
    parser.add_argument("--per-rank", type=int, default=128, help="samples per rank per step (default 128)")
    parser.add_argument("--steps", type=int, default=60, help="steps per epoch (default 60)")
    parser.add_argument("--trials", type=int, default=3, help="runs of every configuration (default 3)")
    parser.add_argument("--bucket-mb", type=float, default=TrainConfig().bucket_mb, help="mpitrain's bucket size")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD.Dup()
    widths = [int(w) for w in args.model.split("-")]
    global_batch = args.per_rank * comm.size
    # The synthetic set holds exactly two epochs' worth of training rows per rank after the
    # 10% validation split, so epoch 2 is the measured one.
    samples = math.ceil(args.steps * global_batch / 0.9) + comm.size
    base = validate(dataclasses.replace(TrainConfig(), model=args.model, batch_size=global_batch, epochs=2,
                                        synth_samples=samples, device="cpu", progress=False, bucket_mb=args.bucket_mb))
    mpitrain_samples_per_s(dataclasses.replace(base, steps=1), "auto", True, 0, comm)  # writes the data set once

    from threadpoolctl import threadpool_info

    runs = {name: [] for name in CONFIGS}
    for _ in range(args.trials):
        for name, setting in CONFIGS.items():
            if setting is None:
                rate = bare_samples_per_s(widths, comm, args.per_rank, args.steps * args.per_rank, args.steps)
            else:
                rate = mpitrain_samples_per_s(base, *setting, comm)
            runs[name].append(comm.bcast(rate, root=0))
    median = {name: float(np.median(values)) for name, values in runs.items()}
    if comm.rank != 0:
        return
    import mpi4py

    blas = sorted({f"{lib['internal_api']} x{lib['num_threads']}" for lib in threadpool_info()})
    command = " ".join(["mpirun", "-n", str(comm.size), "python", *sys.argv])
    print(f"# {command}")
    print(f"# world {comm.size}, model {args.model}, Adam, float32, {args.per_rank} samples/rank/step, "
          f"{args.steps} steps/epoch, bucket {args.bucket_mb} MiB; {MPI.Get_library_version().splitlines()[0].strip()}, "
          f"mpi4py {mpi4py.__version__}, numpy {np.__version__}, BLAS {', '.join(blas)}; median of {args.trials}")
    paired = {name: float(np.median(np.array(values) / np.array(runs["bare"]))) for name, values in runs.items()}
    print(f"{'configuration':<30} {'samples/s':>10} {'vs bare':>8} {'paired':>7}   runs")
    for name, value in median.items():
        label = "bare numpy+mpi4py" if name == "bare" else f"mpitrain {name}"
        print(f"{label:<30} {value:>10.0f} {value / median['bare']:>8.3f} {paired[name]:>7.3f}   "
              + " ".join(f"{v:.0f}" for v in runs[name]))
    for algorithm in ("auto", "ring", "mpi"):
        on, off = median[f"{algorithm} overlap"], median[f"{algorithm} no-overlap"]
        print(f"{algorithm}: overlap on / off = {on / off:.3f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"command": command, "world_size": comm.size, "model": args.model, "per_rank": args.per_rank,
                       "steps_per_epoch": args.steps, "bucket_mb": args.bucket_mb, "trials": args.trials,
                       "mpi": MPI.Get_library_version().splitlines()[0].strip(), "mpi4py": mpi4py.__version__,
                       "numpy": np.__version__, "samples_per_s": median, "runs": runs,
                       "vs_bare": {name: value / median["bare"] for name, value in median.items()},
                       "vs_bare_paired": paired}, out, indent=1)


if __name__ == "__main__":
    main()
