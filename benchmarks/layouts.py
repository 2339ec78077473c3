"""Throughput, memory and traffic per rank of every (DP, TP, PP) layout of an MLP on 4 ranks.

    mpirun -n 4 python benchmarks/layouts.py                          # the README's table
    mpirun -n 4 python benchmarks/layouts.py --json layouts.json      # and the numbers as JSON
    mpirun -n 4 python benchmarks/layouts.py --steps 8 --micro-batches 8
    mpirun -n 4 python benchmarks/layouts.py --model 784-1024-1024-10 --batch-size 2048 --steps 2

Each layout trains the 784-4096-4096-10 ReLU MLP (float32, Adam, global batch 128, synthetic
data) through the one training loop for one warm-up epoch and one timed epoch of --steps steps
each, --repeats times (layouts interleaved; the median is reported). Per layout: samples/s of the
timed epoch; parameter bytes and peak bytes of activations kept for backward on the fullest rank;
bytes sent per step by the busiest rank as the metrics count them, split into tensor-group
(ring all-reduce/all-gather of activations), pipeline (activations and their gradients) and
data-parallel traffic (the bucketed gradient all-reduce: what the chosen algorithm sends); and
the seconds to write the final checkpoint (gathered to rank 0, digest, fsync). A layout that
does not fit the model (four stages of three dense layers) is listed with its error.
"""

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpitrain.comm import world  # noqa: E402
from mpitrain.config import TrainConfig, validate  # noqa: E402
from mpitrain.errors import MpitrainError  # noqa: E402
from mpitrain.train import train  # noqa: E402

LAYOUTS = [(4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2), (1, 1, 4)]


def settings(args, tp: int, pp: int, folder: str) -> TrainConfig:
    return validate(TrainConfig(
        model=args.model, dtype="float32", device="cpu", batch_size=args.batch_size, epochs=2, val_fraction=0.0,
        synth_samples=args.steps * args.batch_size, progress=False, tp=tp, pp=pp,
        micro_batches=args.micro_batches if pp > 1 else 1, pipeline_schedule=args.schedule,
        checkpoint_dir=folder, keep_checkpoints=1))


def run_layout(args, comm, layout, folder: str) -> dict:
    dp, tp, pp = layout
    row = {"layout": f"dp{dp}-tp{tp}-pp{pp}", "dp": dp, "tp": tp, "pp": pp}
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            record = train(settings(args, tp, pp, folder), comm).history[-1]
    except MpitrainError as error:
        return {**row, "error": str(error)}
    keys = ("samples_per_s", "micro_batches", "bubble_fraction", "pipeline_wait_fraction", "param_bytes_per_rank",
            "activation_bytes_per_rank", "optimizer_bytes_per_rank", "tp_bytes_per_step", "pp_bytes_per_step",
            "dp_bytes_per_step", "sent_bytes_per_step")
    # Rank 0 prints "checkpoint: step N -> PATH (S MB in T s)" for the final checkpoint.
    lines = [line for line in out.getvalue().splitlines() if line.startswith("checkpoint:")]
    seconds = float(lines[-1].rsplit(" in ", 1)[1].split()[0]) if lines else None
    return {**row, **{key: record[key] for key in keys}, "checkpoint_s": comm.bcast(seconds, root=0)}


def median_rows(runs: list[list[dict]]) -> list[dict]:
    """Per layout, the run of median samples/s (and the spread of all runs)."""
    rows = []
    for per_layout in zip(*runs):
        if "error" in per_layout[0]:
            rows.append(per_layout[0])
            continue
        ordered = sorted(per_layout, key=lambda row: row["samples_per_s"])
        rows.append({**ordered[len(ordered) // 2], "samples_per_s_all": [row["samples_per_s"] for row in per_layout],
                     "checkpoint_s_all": [row["checkpoint_s"] for row in per_layout]})
    return rows


def mib(value) -> str:
    return "—" if value is None else f"{value / 2**20:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| layout | samples/s (median) | params MiB/rank | activations MiB/rank | "
             "sent MiB/step/rank (tp + pp + dp) | bubble | checkpoint write s |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['layout']} | refused: {row['error']} | | | | | |")
            continue
        sent = (f"{mib(row['sent_bytes_per_step'])} ({mib(row['tp_bytes_per_step'])} + "
                f"{mib(row['pp_bytes_per_step'])} + {mib(row['dp_bytes_per_step'])})")
        bubble = f"{row['bubble_fraction']:.2f} (M={row['micro_batches']})" if row["pp"] > 1 else "—"
        lines.append(f"| {row['layout']} | {row['samples_per_s']:.0f} | {mib(row['param_bytes_per_rank'])} | "
                     f"{mib(row.get('activation_bytes_per_rank'))} | {sent} | {bubble} | "
                     f"{row['checkpoint_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="784-4096-4096-10", help="MLP widths (default 784-4096-4096-10)")
    parser.add_argument("--steps", type=int, default=4, help="steps per epoch, one warm-up and one timed (default 4)")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch (default 128)")
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches of pipelined layouts (default 4)")
    parser.add_argument("--schedule", choices=("1f1b", "gpipe"), default="1f1b", help="pipeline schedule")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every layout, interleaved (default 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows and the run's context as JSON")
    args = parser.parse_args()

    comm = world()
    started = time.perf_counter()
    folder = comm.bcast(tempfile.mkdtemp(prefix="mpitrain-layouts-") if comm.rank == 0 else None, root=0)
    runs = [[run_layout(args, comm, layout, os.path.join(folder, f"r{repeat}-{index}"))
             for index, layout in enumerate(LAYOUTS)] for repeat in range(args.repeats)]
    rows = median_rows(runs)
    if comm.rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    if comm.rank != 0:
        return
    command = f"mpirun -n {comm.size} python benchmarks/layouts.py " + " ".join(sys.argv[1:])
    context = {"command": command.strip(), "world_size": comm.size, "model": args.model, "dtype": "float32",
               "batch_size": args.batch_size, "steps_timed": args.steps, "schedule": args.schedule,
               "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
               "mpi": MPI.Get_library_version().splitlines()[0].strip(), "seconds": time.perf_counter() - started}
    print(f"# {context['command']}")
    print(f"# world {comm.size}, {args.model} float32, global batch {args.batch_size}, {args.steps} timed steps, "
          f"{args.schedule}; {context['cores']} cores; numpy {np.__version__}; {context['mpi']}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"context": context, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
