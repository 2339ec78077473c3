"""The `mpitrain plan` subcommand: flags, the ranked table, --json and --plot.

    mpitrain plan --model 784-4096-4096-10 --batch-size 1024 --ranks 8,64,512,4096 --ranks-per-node 4
    mpitrain plan --model 784-1024-10 --ranks 1,2,4 --profile machine.json --json
    mpirun -n 4 mpitrain plan --calibrate --model 784-4096-4096-10 --batch-size 1024 --out machine.json
"""

import argparse
import dataclasses
import json
import os

from mpitrain.errors import MpitrainError
from mpitrain.plan.profile import default_profile_path, load_profile

DESCRIPTION = """Predict the step time, samples/s, memory per rank and bytes sent per rank per step of
every layout (data x tensor x pipeline parallel degrees, micro-batches, pipeline schedule, ZeRO
stage, all-reduce algorithm; parameter server, sync and async) for each world size in --ranks, rank
them, and say which the model picks and why (its dominant term). Async parameter-server layouts
apply stale gradients, not the one-process run's updates: when one is the pick, the line says so
and names the fastest synchronous layout; `train --layout auto` never picks one. Times come from a
machine profile: --profile, else the one --calibrate wrote to the default place, else the built-in
profile of the 2-core development machine. --calibrate measures a profile on the current
allocation (run it under mpirun on the nodes you will train on). Bytes per rank are exact: they
equal the metrics of a run."""

PROFILE_HELP = """profile fields (JSON): format 1; cores_per_node; gemm_flops_per_s {dtype: FLOP/s per core};
gemm [{dtype, m, k, n, flops_per_s}] measured shapes; memory_bandwidth_per_core and _per_node
(bytes/s); stream [{bytes, bytes_per_s}] by working set; stream_alone_factor; op_overhead_s,
message_overhead_s, step_overhead_s (s); overlap_efficiency (0..1); links {intra: {alpha_s,
beta_s_per_byte}, inter: {...}}; collectives [{algorithm, ranks, nodes, bytes, seconds}]. A hand-written profile needs the first five and links.intra (mpitrain/plan/profile.py)."""


def add_parser(commands) -> None:
    plan = commands.add_parser("plan", help="predict step time, memory and traffic of every layout; calibrate",
                               description=DESCRIPTION, epilog=PROFILE_HELP,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    add = plan.add_argument
    add("--model", default="784-1024-10", metavar="W0-W1-..-Wn", help="layer widths (default 784-1024-10)")
    add("--batch-size", type=int, default=128, metavar="N", help="global batch (default 128)")
    add("--ranks", default="1,2,4", metavar="N1,N2,..", help="world sizes to plan for (default 1,2,4)")
    add("--ranks-per-node", type=int, metavar="R", help="ranks per node (default: the profile's cores per node)")
    add("--profile", metavar="FILE.json", help="machine profile (default: $MPITRAIN_PROFILE, else "
        "~/.cache/mpitrain/machine-profile.json if --calibrate wrote it, else built-in)")
    add("--memory-per-rank", metavar="SIZE", help="memory a rank may use, like 16G: layouts needing more are "
        "listed as infeasible (default: no limit)")
    add("--dtype", choices=("float32", "float64"), default="float32", help="(default float32)")
    add("--optimizer", choices=("adam", "sgd"), default="adam", help="(default adam)")
    add("--zero", default="0,1,2", metavar="S1,S2", help="ZeRO stages to consider (default 0,1,2)")
    add("--no-ps", dest="ps", action="store_false", help="leave out parameter-server layouts (sync and async)")
    add("--top", type=int, default=8, metavar="N", help="layouts shown per world size (default 8)")
    add("--json", action="store_true", help="print every prediction and infeasible layout as JSON")
    add("--plot", metavar="FILE.png", help="predicted samples/s and parallel efficiency against ranks for the "
        "best layouts (needs matplotlib: pip install 'mpitrain[plot]')")
    add("--calibrate", action="store_true", help="measure this allocation and write a profile (run under "
        "mpirun with the ranks and nodes to measure)")
    add("--out", metavar="FILE.json", help="where --calibrate writes (default: the default profile path)")


def _ints(text: str, flag: str, lowest: int) -> list[int]:
    parts = text.split(",")
    if not all(p.strip().isdecimal() and int(p) >= lowest for p in parts):
        raise MpitrainError(f"{flag} '{text}': expected integers >= {lowest} joined by ',', like {lowest},{lowest + 1}")
    return sorted({int(p) for p in parts})


def plan_config(args):
    from mpitrain.config import TrainConfig, validate

    if args.batch_size < 1:
        raise MpitrainError(f"--batch-size {args.batch_size}: must be at least 1")
    return validate(dataclasses.replace(TrainConfig(), model=args.model, batch_size=args.batch_size,
                                        dtype=args.dtype, optimizer=args.optimizer))


def run(args) -> None:
    """Plan (rank 0 prints) or calibrate (collective)."""
    from mpi4py import MPI

    from mpitrain.memory import parse_size
    from mpitrain.nn.model import parse_widths

    widths = parse_widths(args.model)
    config = plan_config(args)
    if args.calibrate:
        _calibrate(args, widths)
        return
    if args.out:
        raise MpitrainError(f"--out {args.out}: it names where --calibrate writes a profile; to read one, "
                            "use --profile")
    ranks = _ints(args.ranks, "--ranks", 1)
    zero = _ints(args.zero, "--zero", 0)
    if max(zero) > 2:
        raise MpitrainError(f"--zero '{args.zero}': stages are 0, 1 and 2")
    limit = None
    if args.memory_per_rank:
        try:
            limit = parse_size(args.memory_per_rank)
        except MpitrainError:
            raise MpitrainError(f"--memory-per-rank {args.memory_per_rank!r}: expected a positive size like 16G, "
                                "512M or 1000000 (bytes)") from None
    if args.top < 1:
        raise MpitrainError(f"--top {args.top}: must be at least 1")
    if args.ranks_per_node is not None and args.ranks_per_node < 1:
        raise MpitrainError(f"--ranks-per-node {args.ranks_per_node}: must be at least 1")
    if args.plot:
        from mpitrain.plan.show import check_plot

        check_plot(args.plot)
    profile = load_profile(args.profile)
    per_node = args.ranks_per_node or profile["cores_per_node"]
    if MPI.COMM_WORLD.rank != 0:
        return
    from mpitrain.plan import search, show

    results = {world: search.search(world, config, widths, per_node, profile, limit, zero_stages=tuple(zero),
                                    parameter_server=args.ps) for world in ranks}
    if args.json:
        print(json.dumps(show.as_json(args, profile, per_node, results), indent=1))
    else:
        print(show.table(args, profile, per_node, results))
    if args.plot:
        show.plot(results, args.plot, args.model)
        if not args.json:
            print(f"wrote {args.plot}")


def _calibrate(args, widths) -> None:
    from mpitrain.comm import agree, world
    from mpitrain.errors import error_of
    from mpitrain.outputs import check_file
    from mpitrain.plan import profile as profiles
    from mpitrain.plan.calibrate import calibrate

    comm = world()
    path = args.out or default_profile_path()
    previous, error = None, None
    if comm.rank == 0:
        error = error_of(check_file, path, True)
        if error is None and os.path.exists(path):  # a profile there is updated, so it must be one
            try:
                previous = profiles.load(path)
            except MpitrainError as exc:
                error = exc
    agree(comm, error)
    previous = comm.bcast(previous, root=0)
    measured = calibrate(comm, widths, args.batch_size, args.dtype, previous)
    agree(comm, error_of(profiles.save, measured, path) if comm.rank == 0 else None)
    if comm.rank == 0:
        print(f"wrote {path}: {measured['source']}")
