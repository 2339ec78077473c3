"""The `mpitrain` command: `train`, `tune`, `plan`, `data`, `eval`, `predict`, `plot` and `doctor`, long flags, an
optional TOML file.

    mpitrain train --steps 100                         # one process
    mpirun -n 4 mpitrain train --config run.toml       # flags override the file
    mpirun -n 4 mpitrain tune                          # thresholds for --allreduce auto
    mpitrain data synth --task linreg --samples 100 --out linreg.h5
    mpirun -n 4 mpitrain eval --model-file model.h5 --data test.h5 --metrics test.json
    mpirun -n 4 mpitrain predict --model-file model.h5 --data new.h5 --out predictions.h5
    mpitrain data inspect 'shards/*.h5'                # datasets, chunks, labels, and the keys to use
    mpitrain data import train.csv --out train.h5 --shards 4
    mpitrain data split all.h5 --train train.h5 --test test.h5 --test-fraction 0.2 --stratify
    mpitrain doctor --clean-shm                        # shared memory left in /dev/shm by killed jobs
    mpitrain plot run.jsonl other.jsonl --out runs.png # curves of --metrics files
    mpitrain plan --model 784-4096-4096-10 --batch-size 1024 --ranks 8,64,512,4096 --ranks-per-node 4
    mpirun -n 4 mpitrain plan --calibrate --model 784-4096-4096-10 --batch-size 1024

An error in input or configuration prints one line, `mpitrain: error: ...`, once, and exits 2.
A run stopped by SIGUSR1/SIGTERM/SIGINT after writing its checkpoint exits 75; one stopped by
Ctrl-C without --checkpoint-dir exits 130 (see mpitrain/preempt.py).
"""

import argparse
import json
import sys
import time

from mpitrain import __version__
from mpitrain.config import CHOICES, TrainConfig, build, load_toml
from mpitrain.errors import MpitrainError
from mpitrain.preempt import EXIT_INTERRUPTED, EXIT_PREEMPTED, Preempted
from mpitrain.presets import PRESETS
from mpitrain.train_flags import add_train_flags

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing, so the message is printed once, by rank 0."""

    def error(self, message):
        raise MpitrainError(message)

    def _print_message(self, message, file=None):
        from mpi4py import MPI

        if MPI.COMM_WORLD.rank == 0:
            super()._print_message(message, file)


def _count(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mpitrain", description="Data-parallel training over MPI with NumPy or CuPy.",
                     epilog="Run under MPI: mpirun -n 4 mpitrain train ...  (see README.md)")
    parser.add_argument("--version", action="version", version=f"mpitrain {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    train = commands.add_parser("train", help="train a model", description="Train an MLP, data-parallel over "
                                "the ranks of the job. Defaults: 784-1024-10 ReLU MLP, Adam lr 1e-3, softmax "
                                "cross-entropy, global batch 128, 3 epochs, on a synthetic set.")
    add_train_flags(train)

    tune = commands.add_parser("tune", help="measure the all-reduce algorithms, save thresholds for auto",
                               description="Time every all-reduce algorithm at powers of two from 8 B up, on "
                               "this job's layout, and save the fastest per size for --allreduce auto; the same "
                               "for the reduce-scatter + all-gather pair that --zero 1 and 2 run. Run it "
                               "under mpirun with the world size you train with.")
    tune.add_argument("--max-mb", type=float, default=64, metavar="MB", help="largest buffer (default 64 MiB)")
    tune.add_argument("--trials", type=int, default=5, metavar="N", help="timed trials per size (default 5)")
    tune.add_argument("--out", metavar="FILE.json", help="tuning file (default: $MPITRAIN_TUNE_FILE, else "
                      "~/.cache/mpitrain/allreduce-tune.json); train reads the same place")

    summary = commands.add_parser("trace-summary", help="per-rank time by kind of work in a --trace file, and "
                                  "the slowest rank's top items")
    summary.add_argument("trace_file", metavar="FILE.json")
    summary.add_argument("--top", type=_count, default=10, metavar="N",
                         help="items of the critical path (default 10; 0 for none)")

    plot = commands.add_parser("plot", help="draw --metrics files: loss, validation, samples/s and learning rate "
                               "against the step, several runs overlaid (needs the plot extra)")
    plot.add_argument("metrics_files", nargs="+", metavar="RUN.jsonl")
    plot.add_argument("--out", required=True, metavar="FILE.png", help="the picture (PNG)")

    data = commands.add_parser("data", help="dataset tools")
    data_commands = data.add_subparsers(dest="data_command", metavar="TOOL", parser_class=_Parser)
    data_commands.required = True
    synth = data_commands.add_parser("synth", help="write a synthetic dataset to HDF5")
    synth.add_argument("--task", choices=("classify", "linreg"), default="classify",
                       help="classify: learnable classes; linreg: y = 2 x0 + 3 x1 + N(0,1), x in [0,1)^2")
    synth.add_argument("--samples", type=int, default=12000, metavar="N", help="rows (default 12000)")
    synth.add_argument("--features", type=int, default=784, metavar="F", help="classify only (default 784)")
    synth.add_argument("--classes", type=int, default=10, metavar="C", help="classify only (default 10)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--out", required=True, metavar="FILE.h5", help="output file (a folder with --shards > 1)")
    synth.add_argument("--shards", type=int, default=1, metavar="K", help="split into K files (default 1)")
    synth.add_argument("--force", action="store_true", help="overwrite an existing --out")
    from mpitrain.data import tools

    tools.add_parsers(data_commands)
    for name, text in (("eval", "score a saved model on a labelled file: loss, accuracy, per-class "
                        "precision/recall/F1 and confusion matrix (ce); mse, mae, R^2 (mse)"),
                       ("predict", "write a saved model's outputs for every row of a file to HDF5")):
        command = commands.add_parser(name, help=text, description=text + ". Each rank reads only its own rows.")
        command.add_argument("--model-file", required=True, metavar="FILE.h5", help="a train --save file")
        command.add_argument("--data", required=True, metavar="PATH", help="HDF5 file, directory or glob")
        command.add_argument("--x-key", default="x", metavar="NAME", help="dataset of inputs (default x)")
        command.add_argument("--batch-rows", type=int, default=4096, metavar="N",
                             help="rows a rank reads and computes at a time (default 4096)")
        command.add_argument("--device", choices=CHOICES["device"], default="auto", help="(default auto)")
    commands.choices["eval"].add_argument("--y-key", default="y", metavar="NAME", help="dataset of labels (default y)")
    commands.choices["eval"].add_argument("--metrics", metavar="FILE.json", help="write the metrics as JSON")
    commands.choices["predict"].add_argument("--out", required=True, metavar="FILE.h5",
                                             help="predictions: class and probabilities (ce) or outputs (mse)")
    commands.choices["predict"].add_argument("--force", action="store_true", help="overwrite an existing --out")
    from mpitrain.plan import command as plan_command

    plan_command.add_parser(commands)
    doctor = commands.add_parser("doctor", help="find and fix what crashed jobs left on this machine",
                                 description="--clean-shm removes MPICH shared-memory segments of dead jobs: "
                                 "regular files of yours in the folder, older than --min-age, that no live "
                                 "process maps or holds open. Run it once per node, outside any MPI job.")
    doctor.add_argument("--clean-shm", action="store_true", help="remove stale mpich_shm_*/mpich_vci_* segments")
    doctor.add_argument("--shm-dir", default="/dev/shm", metavar="DIR", help="(default /dev/shm)")
    doctor.add_argument("--min-age", type=float, default=60.0, metavar="S",
                        help="only segments unchanged for S seconds: a starting job may not have mapped "
                        "its segment yet (default 60)")
    return parser


def run_doctor(args: argparse.Namespace) -> None:
    from mpitrain import shm

    if not args.clean_shm:
        raise MpitrainError("doctor: nothing to do; --clean-shm removes stale shared-memory segments")
    try:
        removed, kept = shm.clean_stale(args.shm_dir, args.min_age)
    except OSError as exc:
        raise MpitrainError(f"{args.shm_dir}: {exc.strerror}") from None
    for path in removed:
        print(f"removed {path}")
    print(f"{len(removed)} stale segment(s) removed from {args.shm_dir}; {len(kept)} in use, recent or not yours kept")


def train_settings(args: argparse.Namespace) -> dict:
    """The settings this command line sets: the preset's, the TOML file's over them, the flags given on top."""
    file_values = load_toml(args.config) if args.config else {}
    preset_values = PRESETS[args.preset].values if args.preset else {}
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "preset") and v is not None}
    return {**preset_values, **file_values, **flags}


def train_config(args: argparse.Namespace) -> TrainConfig:
    return build(train_settings(args), {})


def run_synth(args: argparse.Namespace) -> None:
    from mpitrain.data import synth

    for name in ("samples", "features", "classes", "shards"):
        if getattr(args, name) < 1:
            raise MpitrainError(f"--{name} {getattr(args, name)}: must be at least 1")
    from mpitrain.data.tools import refuse_overwrite

    refuse_overwrite(args.out, args.force)
    if args.task == "classify":
        x, y = synth.make_classification(args.samples, args.features, args.classes, args.seed)
    else:
        x, y = synth.make_linreg(args.samples, args.seed)
    synth.write_h5(args.out, x, y, shards=args.shards)
    print(f"wrote {args.samples} rows ({args.task}) to {args.out}")


def run_tune(args: argparse.Namespace) -> None:
    from mpitrain.comm import agree, tune, world
    from mpitrain.errors import error_of
    from mpitrain.outputs import check_file

    comm = world()
    if comm.size == 1:
        raise MpitrainError("tune times collectives between ranks: run it under mpirun -n N (N > 1)")
    if args.max_mb * (1 << 20) < 8 or args.trials < 1:
        raise MpitrainError(f"--max-mb {args.max_mb} --trials {args.trials}: need at least 8 bytes and one trial")
    path = args.out or tune.cache_path()
    agree(comm, error_of(check_file, path, True) if comm.rank == 0 else None)  # before minutes of timing
    key, table, sharded = tune.tune(comm, int(args.max_mb * (1 << 20)), args.trials, path)
    group = tune.node_group(comm)
    if comm.rank == 0:
        def bands(thresholds):
            if len(thresholds) == 1:
                return f"{thresholds[0][1]} at every size"
            return ", ".join(f"below {bound} B {name}" if bound else f"then {name}" for bound, name in thresholds)

        line = f"{key}: all-reduce {bands(table)}; --zero's reduce-scatter + all-gather {bands(sharded)}"
        if group.cross is not None:
            crossover = group.two_level_bytes
            line += ("; hier crosses nodes from every local rank " +
                     (f"from {crossover} B" if crossover is not None else "never (the leaders alone)"))
        print(f"{line}\nwrote {path}")


def run_model_file(args: argparse.Namespace) -> None:
    """eval or predict, on every rank of the job."""
    from mpitrain import evaluate
    from mpitrain.backend import select_backend
    from mpitrain.data import tools
    from mpitrain.comm import agree, world
    from mpitrain.errors import error_of
    from mpitrain.outputs import check_file

    comm = world()
    if args.batch_rows < 1:
        raise MpitrainError(f"--batch-rows {args.batch_rows}: must be at least 1")
    if args.command == "predict":
        agree(comm, error_of(tools.refuse_overwrite, args.out, args.force) if comm.rank == 0 else None)
    output = args.out if args.command == "predict" else args.metrics
    agree(comm, error_of(check_file, output) if comm.rank == 0 and output else None)
    xp = select_backend(args.device, comm).xp
    model = evaluate.open_model(args.model_file, xp, comm)
    y_key = args.y_key if args.command == "eval" else None
    dataset = evaluate.open_data(args.data, model, args.x_key, y_key, comm)
    try:
        if args.command == "predict":
            evaluate.predict(model, dataset, args.out, xp, comm, args.batch_rows)
            if comm.rank == 0:
                print(f"wrote predictions for {dataset.n_rows} rows of {args.data} to {args.out}")
            return
        metrics = evaluate.evaluate(model, dataset, xp, comm, args.batch_rows)
    finally:
        dataset.close()
    if comm.rank == 0:
        print("\n".join(evaluate.describe_metrics(metrics)))
    if args.metrics:
        from mpitrain.outputs import atomic_write

        text = json.dumps({"model_file": args.model_file, "data": args.data, **metrics}, indent=1).encode()
        agree(comm, error_of(atomic_write, args.metrics, lambda out: out.write(text), True) if comm.rank == 0 else None)


def run(argv: list[str] | None) -> None:
    dispatch(make_parser().parse_args(argv))


def dispatch(args: argparse.Namespace) -> None:
    """Run the subcommand: one handler per command, so none can fall through to another."""
    HANDLERS[args.command](args)


def run_trace_summary(args) -> None:
    from mpi4py import MPI

    from mpitrain import trace_summary

    text = trace_summary.run(args.trace_file, args.top)  # on every rank, so a bad file fails on all alike
    if MPI.COMM_WORLD.rank == 0:
        print(text)


def run_plan(args) -> None:
    from mpitrain.plan import command as plan_command

    plan_command.run(args)


def run_on_rank_0(args) -> None:
    """The data tools and plot are one-process jobs: rank 0 works, the others wait for its verdict."""
    from mpi4py import MPI

    from mpitrain import plot
    from mpitrain.comm import agree, world
    from mpitrain.data import tools

    error = None
    if MPI.COMM_WORLD.rank == 0:
        try:
            if args.command == "plot":
                plot.run(args.metrics_files, args.out)
                print(f"wrote {args.out}")
            else:
                run_synth(args) if args.data_command == "synth" else tools.run(args)
        except MpitrainError as exc:
            error = exc
    agree(world(), error)


def run_train(args) -> None:
    from mpi4py import MPI

    from mpitrain.comm import world
    from mpitrain.settings import complete
    from mpitrain.slurm import check_not_singleton
    from mpitrain.train import train

    check_not_singleton(MPI.COMM_WORLD.size)
    comm, preset = world(), PRESETS.get(args.preset)
    config = build(complete(train_settings(args), comm), {})
    if preset:
        preset.prepare(config, comm)
    result = train(config, comm)
    if preset:
        preset.report(result, comm)


HANDLERS = {"train": run_train, "tune": run_tune, "trace-summary": run_trace_summary, "doctor": run_doctor,
            "plan": run_plan, "eval": run_model_file, "predict": run_model_file, "data": run_on_rank_0,
            "plot": run_on_rank_0}


def parse_agreed(argv: list[str] | None) -> argparse.Namespace:
    """Parse this rank's arguments, then agree with every rank before any leaves (--help, --version,
    an argument error) or communicates: see mpitrain.comm.failure.agree_at_start. Collective."""
    from mpitrain.comm.failure import BAD, LEAVE, RUN, agree_at_start

    args, error, outcome = None, None, RUN
    try:
        args = make_parser().parse_args(argv)
    except MpitrainError as exc:
        error, outcome = exc, BAD
    except SystemExit:  # --help or --version, printed by rank 0
        outcome = LEAVE
    agree_at_start(outcome, error)
    return args


def _report_error(error: MpitrainError) -> None:
    """Print the error once if every rank has it; otherwise this rank alone prints and aborts the job.

    The ranks meet in a non-blocking barrier: if some rank does not arrive within a few seconds
    it is stuck in a collective this rank will never join, and only an abort ends the job.
    """
    from mpi4py import MPI

    from mpitrain.comm import abort

    world = MPI.COMM_WORLD
    arrived = world.Ibarrier()
    deadline = time.monotonic() + 5.0
    while not arrived.Test():
        if time.monotonic() > deadline:
            abort(f"mpitrain: error: [rank {world.rank}] {error}", EXIT_USAGE)
        time.sleep(0.005)
    if world.rank == 0:
        print(f"mpitrain: error: {error}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `mpitrain` and `python -m mpitrain`."""
    from mpitrain.comm import install_abort_handler

    install_abort_handler()
    try:
        dispatch(parse_agreed(argv))
    except MpitrainError as error:
        _report_error(error)
    except Preempted as stop:
        from mpi4py import MPI

        if MPI.COMM_WORLD.rank == 0:
            how = "interrupted" if stop.reason.startswith("SIGINT") else "preempted"
            again = ": run again with --resume auto" if stop.exit_status == EXIT_PREEMPTED else ""
            print(f"mpitrain: {how} by {stop}; exit {stop.exit_status}{again}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_status)
    except KeyboardInterrupt:  # a second Ctrl-C (preempt.py), or one before the handler was installed
        from mpitrain.comm import abort

        abort("mpitrain: interrupted: stopping at once", EXIT_INTERRUPTED)
