"""The flags of `mpitrain train` (also taken by `tune`, `plan --calibrate` and the TOML file): one
argparse group per concern, each flag's help saying what it does, its default and its unit.

Values with fixed choices are not checked here but by config.validate, so a flag, a TOML key and
TrainConfig(...) are refused with the same message (see one_of).
"""

import argparse

from mpitrain.config import CHOICES, GRAD_DTYPE_BYTES, TrainConfig
from mpitrain.presets import PRESETS


def one_of(name: str) -> str:
    """The metavar of a setting with fixed values. The values are checked by config.validate, not by
    argparse, so a flag, a TOML key and TrainConfig(...) are refused with the same message."""
    return "{" + ",".join(CHOICES[name]) + "}"


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    add = parser.add_argument
    group = parser.add_argument_group("data")
    group.add_argument("--data", metavar="PATH", help="HDF5 file, directory or glob of shard files with datasets "
                       "'x' (samples x features) and 'y' (labels); absent: a synthetic set is generated")
    group.add_argument("--x-key", metavar="NAME", help="dataset of inputs, (rows, d1, d2, ...) read flattened; "
                       "a path inside a group works, like train/images (default x)")
    group.add_argument("--y-key", metavar="NAME", help="dataset of labels or targets (default y)")
    group.add_argument("--normalize", metavar=one_of("normalize"),
                       help="standard: (x - mean) / std, minmax: (x - min) / (max - min), per feature over the "
                       "training rows of all ranks; saved with --save and applied again by eval and predict "
                       "(default none)")
    group.add_argument("--val-fraction", type=float, metavar="F",
                       help=f"fraction of rows held out for validation (default {defaults.val_fraction})")
    group.add_argument("--synth-samples", type=int, metavar="N",
                       help=f"rows of the synthetic set used without --data (default {defaults.synth_samples})")
    group.add_argument("--partition", metavar=one_of("partition"),
                       help="how training rows are split over ranks with --sampler shard: contiguous equal "
                       "blocks, or per-class proportional (default uniform)")
    group.add_argument("--sampler", metavar=one_of("sampler"),
                       help="shard: each rank shuffles its own rows; global: every step's global batch comes "
                       "from one seeded permutation, identical for any world size (default shard)")
    group = parser.add_argument_group("model")
    group.add_argument("--model", metavar="W0-W1-..-Wn",
                       help=f"layer widths, input first, output last (default {defaults.model})")
    group.add_argument("--activation", metavar=one_of("activation"), help="hidden activation (default relu)")
    group.add_argument("--loss", metavar=one_of("loss"),
                       help="ce: softmax cross-entropy on integer labels; mse: mean squared error (default ce)")
    group.add_argument("--dtype", metavar=one_of("dtype"), help="parameter and activation dtype (default float32)")
    group = parser.add_argument_group("optimization")
    group.add_argument("--optimizer", metavar=one_of("optimizer"), help="(default adam)")
    group.add_argument("--lr", type=float, help=f"learning rate (default {defaults.lr})")
    group.add_argument("--momentum", type=float, help="SGD momentum (default 0)")
    group.add_argument("--weight-decay", type=float, help="L2 weight decay (default 0)")
    group.add_argument("--schedule", metavar=one_of("schedule"),
                       help="learning-rate schedule after the warm-up: cosine and linear fall to --min-lr at the last "
                       "step; step multiplies the rate by --lr-decay after every epoch; plateau when the validation "
                       "loss has not improved for --lr-patience epochs (default constant)")
    group.add_argument("--warmup-steps", type=int, metavar="N", help="linear warm-up steps (default 0)")
    group.add_argument("--lr-decay", type=float, metavar="F",
                       help=f"factor of each decay of --schedule step and plateau (default {defaults.lr_decay})")
    group.add_argument("--lr-patience", type=int, metavar="E",
                       help=f"--schedule plateau: epochs without a better validation loss before a decay "
                       f"(default {defaults.lr_patience})")
    group.add_argument("--min-lr", type=float, metavar="LR", help="the rate no schedule goes below (default 0)")
    group.add_argument("--early-stop", type=int, metavar="PATIENCE",
                       help="stop when the validation loss has not improved for PATIENCE epochs")
    group.add_argument("--batch-size", type=int, metavar="N",
                       help=f"GLOBAL batch, split over ranks (default {defaults.batch_size})")
    group.add_argument("--epochs", type=int, metavar="N", help=f"(default {defaults.epochs})")
    group.add_argument("--steps", type=int, metavar="N",
                       help="total optimizer steps, overriding --epochs; 0 saves the initial parameters")
    group.add_argument("--seed", type=int, help="seeds init, shuffling and the synthetic set (default 0)")
    group = parser.add_argument_group("parallel and hardware")
    group.add_argument("--allreduce", metavar=one_of("allreduce"),
                       help="gradient sum: auto picks by bucket size from `mpitrain tune`'s thresholds (under "
                       "--zero, those of the reduce-scatter + all-gather pair); ring "
                       "(pipelined), rd (recursive doubling), hier (shared memory per node + ring over "
                       "nodes), mpi (MPI Allreduce) (default auto)")
    group.add_argument("--device", metavar=one_of("device"),
                       help="cpu (NumPy), gpu (CuPy, GPU local_rank %% count), auto: gpu if one is visible (default auto)")
    group.add_argument("--max-memory", metavar="SIZE",
                       help="memory one rank may use, like 64G or 512M: a run estimated to need more stops "
                       "before allocating (default: the node's available memory / its ranks)")
    group.add_argument("--threads", type=int, metavar="N",
                       help="BLAS threads per rank (default: cores / ranks on the node; env MPITRAIN_THREADS)")
    group = parser.add_argument_group("model parallelism", "world = data-parallel x --pp x --tp ranks")
    group.add_argument("--tp", type=int, metavar="T", help="tensor-parallel group size: dense layers pair up as "
                       "column/row-sliced layers over T adjacent ranks (default 1)")
    group.add_argument("--pp", type=int, metavar="P", help="pipeline stages: the dense layers split into P "
                       "stages balanced by parameter count (default 1)")
    group.add_argument("--stages", metavar="N1,N2,..", help="dense layers per pipeline stage instead of balancing")
    group.add_argument("--micro-batches", type=int, metavar="M",
                       help="micro-batches per data-parallel group's share of each step (default 1)")
    group.add_argument("--pipeline-schedule", metavar=one_of("pipeline_schedule"),
                       help="gpipe: all forwards then all backwards; 1f1b: fewer activations in flight (default 1f1b)")
    group.add_argument("--layout", metavar=one_of("layout"),
                       help="auto: the tensor, pipeline and micro-batch sizes and the all-reduce algorithm that "
                       "`mpitrain plan` predicts fastest for this job's ranks, printed at start; never a parameter "
                       "server, whose async mode changes the optimization (default manual: the flags above)")
    group.add_argument("--profile", metavar="FILE.json", help="machine profile for --layout auto (default: "
                       "$MPITRAIN_PROFILE, else the one `mpitrain plan --calibrate` wrote, else built-in)")
    group.add_argument("--init-from", metavar="FILE.h5", help="start from a --save file or a checkpoint (any "
                       "layout); without --model, its model")
    group = parser.add_argument_group("parameter server")
    group.add_argument("--sync", metavar=one_of("sync"),
                       help="allreduce: every rank trains and gradients are summed by --allreduce (default); "
                       "ps: the last --servers ranks hold the parameters, the others push gradients and pull them")
    group.add_argument("--servers", type=int, metavar="S",
                       help="server ranks with --sync ps; each holds one contiguous range of the parameters (default 1)")
    group.add_argument("--ps-mode", metavar=one_of("ps_mode"),
                       help="sync: one update per step from every worker's gradient; async: each gradient is "
                       "applied as it arrives (default sync)")
    group.add_argument("--staleness", type=int, metavar="K",
                       help="with --ps-mode sync, a worker may run up to K steps ahead of the slowest "
                       "(stale-synchronous; default 0: lock-step)")
    group.add_argument("--staleness-lr", action="store_const", const=True,
                       help="weigh each gradient by 1 / (1 + its staleness): its learning rate in async "
                       "mode, its share of the step's sum in sync mode")
    group = parser.add_argument_group("gradient sync")
    group.add_argument("--bucket-mb", type=float, metavar="MB",
                       help=f"gradients are summed in buckets of whole layers of at most MB MiB, last layers "
                       f"first (default {defaults.bucket_mb})")
    group.add_argument("--overlap", action=argparse.BooleanOptionalAction,
                       help="start each bucket's all-reduce during backward, as soon as its layers are done "
                       "(default on)")
    group.add_argument("--grad-dtype", metavar="{" + ",".join(GRAD_DTYPE_BYTES) + "}",
                       help="exchange gradient buckets in this dtype and sum them in the parameters' (bfloat16 "
                       "needs ml_dtypes); halves the bytes sent (default: the parameters' dtype)")
    group.add_argument("--error-feedback", action=argparse.BooleanOptionalAction,
                       help="with --grad-dtype: add what rounding lost at one step to the next step's gradient "
                       "(--no-error-feedback: not, e.g. on resuming a run that had it)")
    group.add_argument("--zero", type=int, metavar="STAGE",
                       help="shard over the data-parallel ranks: 1 the optimizer state (gradients reduce-scattered, "
                       "each rank updates its 1/dp of the parameters, then they are all-gathered), 2 also the "
                       "gradients; 0 none (default 0)")
    group = parser.add_argument_group("output")
    group.add_argument("--metrics", metavar="FILE.jsonl",
                       help="one JSON object per epoch (and per --log-every steps), and a final summary")
    group.add_argument("--log-every", type=int, metavar="N", help="add a step record every N steps to --metrics "
                       "and --tensorboard")
    group.add_argument("--tensorboard", metavar="DIR", help="write the records' scalars as TensorBoard event "
                       "files (needs the tensorboard extra)")
    group.add_argument("--save", metavar="FILE.h5", help="final parameters, one dataset per parameter (0/weight, ...)")
    group.add_argument("--save-best", metavar="FILE.h5",
                       help="the parameters of the epoch with the lowest validation loss, as --save writes them")
    group.add_argument("--progress", action=argparse.BooleanOptionalAction,
                       help="progress bar on stderr (default: only when stderr is a terminal)")
    group = parser.add_argument_group("checkpoints, preemption and failures")
    group.add_argument("--checkpoint-dir", metavar="DIR",
                       help="write checkpoints here (ckpt-<step>.h5); also turns SIGUSR1/SIGTERM and Ctrl-C into "
                       "a checkpoint and exit 75 (requeue)")
    group.add_argument("--checkpoint-every", type=int, metavar="N",
                       help="checkpoint every N steps (default: only at the end and when signalled)")
    group.add_argument("--keep-checkpoints", type=int, metavar="K",
                       help=f"keep the newest K checkpoints (default {defaults.keep_checkpoints})")
    group.add_argument("--resume", metavar="PATH|auto",
                       help="continue from a checkpoint file, or from the newest valid one in --checkpoint-dir "
                       "(auto: start at step 0 when there is none), with the settings of its run under those "
                       "given here")
    group.add_argument("--comm-timeout", type=float, metavar="S",
                       help="abort every rank, naming the operation each waits in, when one communication "
                       "call waits longer than S seconds (default: wait forever)")
    group.add_argument("--check-collectives", action="store_const", const=True,
                       help="before each collective and send/receive of the library, compare a fingerprint of "
                       "the call across ranks and stop at the first mismatch, naming both call sites "
                       "(env MPITRAIN_CHECK_COLLECTIVES=1)")
    group.add_argument("--trace", metavar="FILE.json", help="write a timeline of every rank's compute, messages "
                       "and waits (Chrome/Perfetto trace; env MPITRAIN_TRACE); see `mpitrain trace-summary`")
    group.add_argument("--trace-steps", metavar="A:B", help="trace only steps A..B-1 (counted from 0)")
    group.add_argument("--on-nan", metavar=one_of("on_nan"),
                       help="NaN or Inf in the loss or gradients: stop with an error, or skip the update on "
                       "every rank and count it (default abort)")
    add("--preset", choices=PRESETS, help="start from a named recipe, which the config file and flags override: "
        "linreg-ps fits y = 2 x0 + 3 x1 + noise with asynchronous parameter-server SGD and prints theta")
    add("--config", metavar="FILE.toml", help="TOML file of the same settings (keys as the flags, e.g. "
        "batch-size = 256, optionally under [train]); flags given on the command line win")
