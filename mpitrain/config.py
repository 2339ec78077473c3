"""Training configuration: one dataclass, filled from defaults, then a TOML file, then flags.

Every value is checked here, on construction, before any rank communicates, so a bad value fails
identically on every rank with a one-line message, whether it came from a flag, a TOML file or
`TrainConfig(...)` in Python.
"""

import math
import typing
from dataclasses import dataclass, fields

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from mpitrain.errors import MpitrainError

CHOICES = {
    "activation": ("relu", "tanh"),
    "loss": ("ce", "mse"),
    "optimizer": ("adam", "sgd"),
    "schedule": ("constant", "cosine", "linear", "step", "plateau"),
    "partition": ("uniform", "stratified"),
    "sampler": ("shard", "global"),
    "allreduce": ("auto", "ring", "rd", "hier", "mpi"),
    "dtype": ("float32", "float64"),
    "device": ("cpu", "gpu", "auto"),
    "pipeline_schedule": ("1f1b", "gpipe"),
    "sync": ("allreduce", "ps"),
    "ps_mode": ("sync", "async"),
    "on_nan": ("abort", "skip"),
    "normalize": ("none", "standard", "minmax"),
    "layout": ("manual", "auto"),
}


@dataclass
class TrainConfig:
    """Everything a training run depends on; the defaults train the reference MLP."""

    data: str | None = None
    x_key: str = "x"
    y_key: str = "y"
    normalize: str = "none"
    val_fraction: float = 0.1
    synth_samples: int = 12000
    model: str = "784-1024-10"
    activation: str = "relu"
    loss: str = "ce"
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    # --schedule step and plateau multiply the rate by lr_decay (after every epoch; after lr_patience
    # epochs without a better validation loss); cosine and linear end at min_lr, none goes below it
    lr_decay: float = 0.5
    lr_patience: int = 2
    min_lr: float = 0.0
    early_stop: int | None = None
    batch_size: int = 128
    epochs: int = 3
    steps: int | None = None
    partition: str = "uniform"
    sampler: str = "shard"
    allreduce: str = "auto"
    dtype: str = "float32"
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    metrics: str | None = None
    log_every: int | None = None
    tensorboard: str | None = None
    save: str | None = None
    save_best: str | None = None
    # None: a progress bar when stderr is a terminal
    progress: bool | None = None
    # model parallelism (mpitrain.parallel)
    tp: int = 1
    pp: int = 1
    stages: str | None = None
    micro_batches: int = 1
    pipeline_schedule: str = "1f1b"
    init_from: str | None = None
    # manual: --tp/--pp/--micro-batches as given; auto: the layout `mpitrain plan` picks (mpitrain/plan/auto.py)
    layout: str = "manual"
    profile: str | None = None
    # parameter server (mpitrain/parallel/ps.py), used with sync = "ps"
    sync: str = "allreduce"
    servers: int = 1
    ps_mode: str = "sync"
    staleness: int = 0
    staleness_lr: bool = False
    # checkpoints, preemption and failure handling (mpitrain/resilience.py)
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 3
    resume: str | None = None
    comm_timeout: float | None = None
    check_collectives: bool = False
    trace: str | None = None
    trace_steps: str | None = None
    on_nan: str = "abort"
    bucket_mb: float = 1.0
    overlap: bool = True
    # sharded optimizer state (0: none, 1: optimizer state, 2: and gradients), over the data-parallel groups
    zero: int = 0
    # gradient buckets exchanged in a narrower dtype (None: the parameters'), rounding fed back
    grad_dtype: str | None = None
    error_feedback: bool = False
    # memory per rank (mpitrain/memory.py): a size like 64G; None: what the node has available
    max_memory: str | None = None

    def __post_init__(self):
        # The one validation path of the command line, the TOML file and the Python API: a bad
        # value never reaches the ranks, whichever way it came in.
        for name in FIELD_TYPES:
            setattr(self, name, coerce(name, getattr(self, name), "TrainConfig"))
        validate(self)


FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}


def coerce(name: str, value, where: str):
    """Check one value against its field's type; ints are accepted where floats are expected (and
    subclasses, like NumPy's float64, as their base type), booleans never as numbers."""
    kind = FIELD_TYPES[name]
    union = typing.get_args(kind)
    if union and value is None:
        return None
    base = union[0] if union else kind
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, base) or (base is not bool and isinstance(value, bool)):
        raise MpitrainError(f"{where}: {name} = {value!r} is not a{'n' if base is int else ''} {base.__name__}")
    return base(value)


def load_toml(path: str) -> dict:
    """Read a TOML config file into {field: value}; keys may use dashes or underscores.

    Settings may sit at the top level, in a [train] table, or both: every key is read, and a
    setting given twice (in both places, or as batch-size and batch_size) is refused rather than
    one of them silently dropped.
    """
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise MpitrainError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise MpitrainError(f"{path}: is a directory, not a config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise MpitrainError(f"{path}: malformed TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MpitrainError(f"{path}: cannot read the config file ({exc})") from None
    table = raw.get("train", {})
    if not isinstance(table, dict):
        raise MpitrainError(f"{path}: 'train' must be a table ([train]), not a {type(table).__name__}")
    entries = [(key, value, "") for key, value in raw.items() if key != "train"]
    entries += [(key, value, "[train] ") for key, value in table.items()]
    values, first = {}, {}
    for key, value, table_name in entries:
        name = key.replace("-", "_")
        if name not in FIELD_TYPES:
            raise MpitrainError(f"{path}: unknown key {table_name}{key!r}")
        if name in values:
            raise MpitrainError(f"{path}: {name.replace('_', '-')} is set twice ({first[name]} and "
                                f"{table_name}{key!r}): keep one")
        values[name], first[name] = coerce(name, value, path), f"{table_name}{key!r}"
    return values


def validate(config: TrainConfig) -> TrainConfig:
    """Raise MpitrainError naming the first bad value; return the config unchanged."""
    for name, allowed in CHOICES.items():
        value = getattr(config, name)
        if value not in allowed:
            raise MpitrainError(f"--{name.replace('_', '-')} {value!r}: expected one of {', '.join(allowed)}")
    positive = {"batch_size": config.batch_size, "synth_samples": config.synth_samples,
                "tp": config.tp, "pp": config.pp, "micro_batches": config.micro_batches, "servers": config.servers}
    if config.threads is not None:
        positive["threads"] = config.threads
    for name, value in positive.items():
        if value < 1:
            raise MpitrainError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if config.epochs < (1 if config.steps is None else 0):
        raise MpitrainError(f"--epochs {config.epochs}: must be at least 1")
    # Every seeded generator (NumPy's SeedSequence) takes a non-negative integer; 2^63 keeps it an int64.
    if not 0 <= config.seed < 2**63:
        raise MpitrainError(f"--seed {config.seed}: must be in [0, 2^63)")
    if config.staleness < 0:
        raise MpitrainError(f"--staleness {config.staleness}: must be 0 or more")
    if config.max_memory is not None:
        from mpitrain.memory import parse_size

        parse_size(config.max_memory)
    from mpitrain.nn.model import parse_widths
    from mpitrain.trace import parse_steps

    parse_widths(config.model)
    parse_steps(config.trace_steps)
    if config.steps is not None and config.steps < 0:
        raise MpitrainError(f"--steps {config.steps}: must be 0 or more")
    if config.partition == "stratified" and config.loss != "ce":
        raise MpitrainError("--partition stratified deals out classes: it needs --loss ce")
    for name in ("x_key", "y_key"):
        if not getattr(config, name).strip("/"):
            raise MpitrainError(f"--{name.replace('_', '-')} {getattr(config, name)!r}: must name a dataset")
    if not 0.0 <= config.val_fraction < 1.0:
        raise MpitrainError(f"--val-fraction {config.val_fraction}: must be in [0, 1)")
    for name in ("lr", "momentum", "weight_decay"):
        value = getattr(config, name)
        if not math.isfinite(value) or value < 0:
            raise MpitrainError(f"--{name.replace('_', '-')} {value}: must be a finite number >= 0")
    if config.momentum >= 1:
        raise MpitrainError(f"--momentum {config.momentum}: must be below 1 (at 1 or more the velocity never decays)")
    if config.warmup_steps < 0:
        raise MpitrainError(f"--warmup-steps {config.warmup_steps}: must be 0 or more")
    _validate_schedule(config)
    for name in ("log_every", "early_stop", "lr_patience"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise MpitrainError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    _validate_resilience(config)
    if config.layout == "auto":
        given = [f"--{name.replace('_', '-')}" for name, default in (("tp", 1), ("pp", 1), ("micro_batches", 1),
                 ("stages", None), ("sync", "allreduce")) if getattr(config, name) != default]
        if given:
            raise MpitrainError(f"--layout auto chooses the layout itself: leave out {', '.join(given)}")
    if not (math.isfinite(config.bucket_mb) and config.bucket_mb > 0):
        raise MpitrainError(f"--bucket-mb {config.bucket_mb}: must be a positive number of MiB")
    if config.zero not in (0, 1, 2):
        raise MpitrainError(f"--zero {config.zero}: expected 0 (no sharding), 1 (optimizer state) or 2 (and gradients)")
    _validate_compression(config)
    problem = zero_problem(config.zero, config.micro_batches)
    if problem is not None:
        raise MpitrainError(problem)
    if config.zero and config.sync == "ps":
        raise MpitrainError("--zero shards the data-parallel gradient sum: it needs --sync allreduce "
                            "(the parameter server already holds one copy of the optimizer state)")
    return config


def zero_problem(zero: int, micro_batches: int) -> str | None:
    """Why a ZeRO stage cannot run with this many micro-batches (None: it can); the plan's search
    marks such layouts infeasible with the same words."""
    if zero == 2 and micro_batches > 1:
        return (f"--zero 2 keeps only the gradient shard, but --micro-batches {micro_batches} adds every layer's "
                "gradient up over the step's micro-batches: use --zero 1")
    return None


def _validate_schedule(config: TrainConfig) -> None:
    if not (math.isfinite(config.lr_decay) and 0 < config.lr_decay < 1):
        raise MpitrainError(f"--lr-decay {config.lr_decay}: must be between 0 and 1 (the factor each decay "
                            "multiplies the rate by)")
    if not (math.isfinite(config.min_lr) and 0 <= config.min_lr <= config.lr):
        raise MpitrainError(f"--min-lr {config.min_lr}: must be between 0 and --lr {config.lr}")
    # The parameter server validates once, at the end of the run (parallel/ps_train.py): nothing
    # could act on a validation loss while it trains.
    watched = [flag for flag, used in (("--early-stop", config.early_stop is not None),
                                       ("--save-best", config.save_best is not None),
                                       ("--schedule plateau", config.schedule == "plateau")) if used]
    if config.sync == "ps" and config.log_every is not None:
        raise MpitrainError("--log-every takes step records from the per-step agreement of --sync allreduce; "
                            "--sync ps has none: its epoch records are all there is")
    if config.sync == "ps" and watched:
        raise MpitrainError(f"{watched[0]} acts on each epoch's validation loss, which --sync ps computes only at "
                            "the end of the run: use --sync allreduce")
    if watched and not config.val_fraction:
        raise MpitrainError(f"{watched[0]} acts on the validation loss: it needs --val-fraction above 0")


GRAD_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _validate_compression(config: TrainConfig) -> None:
    import importlib.util

    if config.grad_dtype is not None and config.grad_dtype not in GRAD_DTYPE_BYTES:
        raise MpitrainError(f"--grad-dtype {config.grad_dtype!r}: expected one of {', '.join(GRAD_DTYPE_BYTES)}")
    if config.grad_dtype == "bfloat16" and importlib.util.find_spec("ml_dtypes") is None:
        raise MpitrainError("--grad-dtype bfloat16 needs the ml_dtypes package: pip install ml_dtypes (or mpitrain[compress])")
    narrower = config.grad_dtype is not None and GRAD_DTYPE_BYTES[config.grad_dtype] < int(config.dtype[-2:]) // 8
    if narrower and config.allreduce not in ("auto", "ring"):
        raise MpitrainError(f"--grad-dtype {config.grad_dtype} sums by a pairwise exchange and the ring's all-gather: "
                            f"use --allreduce ring or auto, not {config.allreduce}")
    if narrower and config.sync == "ps":
        raise MpitrainError(f"--grad-dtype {config.grad_dtype} compresses the all-reduce's buckets: it needs --sync allreduce")
    if config.error_feedback and not narrower:
        raise MpitrainError(f"--error-feedback feeds back what --grad-dtype's rounding lost: it needs a --grad-dtype "
                            f"narrower than --dtype {config.dtype}")


def _validate_resilience(config: TrainConfig) -> None:
    if config.checkpoint_every is not None and config.checkpoint_every < 1:
        raise MpitrainError(f"--checkpoint-every {config.checkpoint_every}: must be at least 1")
    if config.keep_checkpoints < 1:
        raise MpitrainError(f"--keep-checkpoints {config.keep_checkpoints}: must be at least 1")
    if config.checkpoint_every is not None and config.checkpoint_dir is None:
        raise MpitrainError("--checkpoint-every needs --checkpoint-dir")
    if config.resume == "auto" and config.checkpoint_dir is None:
        raise MpitrainError("--resume auto needs --checkpoint-dir (the folder searched for the newest checkpoint)")
    if config.comm_timeout is not None and not (math.isfinite(config.comm_timeout) and config.comm_timeout > 0):
        raise MpitrainError(f"--comm-timeout {config.comm_timeout}: must be a positive number of seconds")


def build(file_values: dict, flag_values: dict) -> TrainConfig:
    """Defaults, overridden by the TOML file's values, overridden by the flags given (validated on
    construction)."""
    return TrainConfig(**{**file_values, **{k: v for k, v in flag_values.items() if v is not None}})


def as_dict(config: TrainConfig) -> dict:
    """The config as plain JSON-able values (for metrics and checkpoints)."""
    return {f.name: getattr(config, f.name) for f in fields(config)}
