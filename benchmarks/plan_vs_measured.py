"""Predicted against measured step time of the layouts of 1, 2 and 4 ranks, in one run.

    mpirun -n 4 python benchmarks/plan_vs_measured.py --calibrate                     # the README's table
    mpirun -n 4 python benchmarks/plan_vs_measured.py --profile machine.json          # a profile made before
    mpirun -n 4 python benchmarks/plan_vs_measured.py --profile machine.json --json out.json
    MPITRAIN_RANKS_PER_NODE=2 mpirun -n 4 python benchmarks/plan_vs_measured.py ...   # two emulated hosts

For each model (the reference 784-1024-10 and 784-4096-4096-10; float32, Adam, global batch
--batch-size, synthetic data) and each layout below, the first N ranks of the job train one
warm-up epoch and one timed epoch of --steps steps (the other ranks sleep, so they take no core),
--repeats times with the layouts interleaved; the measured step is the median of batch / samples/s
of the timed epochs (for the asynchronous parameter server: W gradients, as its metrics count a
step). The prediction is `mpitrain plan`'s for the same layout on N ranks of one node (or of
--ranks-per-node) with the given profile. A prediction is within the target when
predicted / measured is in [0.75, 1.25]; the ranking is right when the fastest predicted layout
of a world size is the fastest measured, or measured within the runs' spread of it.

--calibrate measures the profile in the same run, just before the layouts (as `mpitrain plan
--calibrate` does: on 4 ranks, then on 2 for each model, merged), so both see the same machine.
"""

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import sys
import time

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpitrain.backend import settle_threads  # noqa: E402
from mpitrain.comm import world  # noqa: E402
from mpitrain.config import TrainConfig, validate  # noqa: E402
from mpitrain.nn.model import parse_widths  # noqa: E402
from mpitrain.plan.calibrate import polite_barrier  # noqa: E402
from mpitrain.plan.cost import Spec  # noqa: E402
from mpitrain.plan.profile import load_profile  # noqa: E402
from mpitrain.plan.timing import predict  # noqa: E402
from mpitrain.train import train  # noqa: E402

MODELS = ("784-1024-10", "784-4096-4096-10")
# (ranks, name, spec); the grid's all-reduce is `auto`, as a run without --allreduce uses.
LAYOUTS = [
    (1, "one", Spec("grid", 1)),
    (2, "dp", Spec("grid", 2, algorithm="auto")),
    (2, "tp", Spec("grid", 1, tp=2)),
    (2, "pp", Spec("grid", 1, pp=2, micro_batches=4)),
    (2, "ps", Spec("ps", 1, servers=1)),
    (2, "async ps", Spec("ps", 1, servers=1, ps_mode="async")),
    (4, "dp", Spec("grid", 4, algorithm="auto")),
    (4, "tp", Spec("grid", 1, tp=4)),
    (4, "dp x tp", Spec("grid", 2, tp=2, algorithm="auto")),
    (4, "tp x pp", Spec("grid", 1, tp=2, pp=2, micro_batches=4)),
    (4, "dp x pp", Spec("grid", 2, pp=2, micro_batches=4, algorithm="auto")),
    (4, "ps", Spec("ps", 3, servers=1)),
    (4, "async ps", Spec("ps", 3, servers=1, ps_mode="async")),
]


def settings(args, model: str, spec: Spec) -> TrainConfig:
    grid = dict(tp=spec.tp, pp=spec.pp, micro_batches=spec.micro_batches, pipeline_schedule=spec.schedule)
    return validate(TrainConfig(
        model=model, dtype="float32", device="cpu", batch_size=args.batch_size, epochs=2, val_fraction=0.0,
        synth_samples=args.steps * args.batch_size, progress=False,
        **(dict(sync="ps", servers=spec.servers, ps_mode=spec.ps_mode) if spec.kind == "ps" else grid)))


def measure(args, comm, model: str, ranks: int, spec: Spec) -> float | None:
    """Seconds per step of the timed epoch on the first `ranks` ranks (None on the others)."""
    group = comm.Split(0 if comm.rank < ranks else MPI.UNDEFINED, key=comm.rank)
    seconds = None
    if group != MPI.COMM_NULL:
        with contextlib.redirect_stdout(io.StringIO()):
            # The second record is the timed epoch: an async parameter server's fast workers may
            # start a third epoch of their own rows, which the last record would be.
            record = train(settings(args, model, spec), group).history[1]
        seconds = args.batch_size / record["samples_per_s"]
        group.Free()
    settle_threads()  # a one-rank layout's second BLAS thread spins on, on the next layout's core
    polite_barrier(comm)
    return comm.bcast(seconds, root=0)


def calibrate_here(args, comm) -> dict:
    """The profile measured on the first 4 ranks (the big model's shapes), then on 2 for each model."""
    from mpitrain.plan.calibrate import calibrate
    from mpitrain.plan.profile import save

    models = args.models.split(",")
    steps = [(4, models[-1])] + [(2, model) for model in models]
    profile = None
    for ranks, model in steps:
        if ranks > comm.size:
            continue
        group = comm.Split(0 if comm.rank < ranks else MPI.UNDEFINED, key=comm.rank)
        if group != MPI.COMM_NULL:
            with contextlib.redirect_stdout(io.StringIO()):
                profile = calibrate(group, parse_widths(model), args.batch_size, "float32", profile)
            group.Free()
        polite_barrier(comm)
        profile = comm.bcast(profile, root=0)
    if comm.rank == 0:
        save(profile, args.calibrate)
    return profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", metavar="FILE.json", help="machine profile (default: as `mpitrain plan`)")
    parser.add_argument("--calibrate", metavar="OUT.json", help="measure the profile first, in this run, and "
                        "write it here")
    parser.add_argument("--steps", type=int, default=3, help="steps per epoch, one warm-up and one timed (default 3)")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every layout, interleaved (default 3)")
    parser.add_argument("--ranks-per-node", type=int, help="for the predictions (default: the job's ranks)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"(default {','.join(MODELS)})")
    parser.add_argument("--json", metavar="FILE", help="also write the rows and the run's context as JSON")
    args = parser.parse_args()
    comm = world()
    started = time.perf_counter()
    profile = calibrate_here(args, comm) if args.calibrate else load_profile(args.profile)
    cases = [(model, ranks, name, spec) for model in args.models.split(",") for ranks, name, spec in LAYOUTS
             if ranks <= comm.size]
    runs = {case[:3]: [] for case in cases}
    for _ in range(args.repeats):
        for model, ranks, name, spec in cases:
            runs[(model, ranks, name)].append(measure(args, comm, model, ranks, spec))
    if comm.rank != 0:
        return
    rows = []
    for model, ranks, name, spec in cases:
        config = settings(args, model, spec)
        per_node = args.ranks_per_node or ranks
        predicted = predict(spec, config, parse_widths(model), per_node, profile)
        measured = runs[(model, ranks, name)]
        rows.append({"model": model, "ranks": ranks, "layout": name, "spec": dataclasses.asdict(spec),
                     "predicted_s": predicted.step_s, "measured_s": float(np.median(measured)), "measured_all_s": measured,
                     "ratio": predicted.step_s / float(np.median(measured)), "dominant": predicted.dominant,
                     "terms": predicted.terms})
    command = f"mpirun -n {comm.size} python benchmarks/plan_vs_measured.py " + " ".join(sys.argv[1:])
    context = {"command": command.strip(), "world_size": comm.size, "batch_size": args.batch_size,
               "steps_timed": args.steps, "repeats": args.repeats, "profile": profile["source"],
               "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
               "mpi": MPI.Get_library_version().splitlines()[0].strip(), "seconds": time.perf_counter() - started}
    print(f"# {context['command']}")
    print(f"# float32 Adam, global batch {args.batch_size}, {args.steps} timed steps x {args.repeats} repeats; "
          f"{context['cores']} cores; numpy {np.__version__}; {context['mpi']}; profile: {profile['source']}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"context": context, "rows": rows}, handle, indent=2)


def table(rows: list[dict]) -> str:
    lines = ["| model | ranks | layout | predicted ms | measured ms (median; runs) | predicted / measured | dominant |",
             "|---|---:|---|---:|---|---:|---|"]
    for row in rows:
        runs = ", ".join(f"{s * 1e3:.0f}" for s in row["measured_all_s"])
        flag = "" if 0.75 <= row["ratio"] <= 1.25 else " **outside 25 %**"
        lines.append(f"| {row['model']} | {row['ranks']} | {row['layout']} | {row['predicted_s'] * 1e3:.1f} | "
                     f"{row['measured_s'] * 1e3:.1f} ({runs}) | {row['ratio']:.2f}{flag} | {row['dominant']} |")
    within = sum(0.75 <= row["ratio"] <= 1.25 for row in rows)
    lines.append("")
    lines.append(f"{within} of {len(rows)} predictions within 25 % of the measured median.")
    for model in dict.fromkeys(row["model"] for row in rows):
        for ranks in sorted({row["ranks"] for row in rows if row["model"] == model}):
            group = [row for row in rows if row["model"] == model and row["ranks"] == ranks]
            if len(group) < 2:
                continue
            best_predicted = min(group, key=lambda row: row["predicted_s"])
            best_measured = min(group, key=lambda row: row["measured_s"])
            noise = best_predicted["measured_s"] <= max(best_measured["measured_all_s"])
            verdict = "right" if best_predicted is best_measured else ("within noise" if noise else "WRONG")
            order_p = " < ".join(row["layout"] for row in sorted(group, key=lambda row: row["predicted_s"]))
            order_m = " < ".join(row["layout"] for row in sorted(group, key=lambda row: row["measured_s"]))
            lines.append(f"{model}, {ranks} ranks: ranking {verdict}; predicted {order_p}; measured {order_m}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
