"""Memory per rank, estimated before anything large is allocated, against a limit.

    check_memory(config, widths, comm)             # parameters, gradients, optimizer state, activations
    check_memory(config, widths, comm, dataset)    # ... and this rank's share of the rows

Without this a model or a data file that does not fit dies in NumPy's allocator, rank by rank,
with a MemoryError traceback (a 32-1000000000-5 MLP wants 142 GiB of parameters alone; a file
declaring 10^12 rows makes every rank build a 10^12-row permutation for the validation split).
The model's part, the fullest rank's parameters, gradients, optimizer state and activations, is
`mpitrain plan`'s count for the run's layout (plan/cost.py), the numbers the metrics report; the
data's part is an estimate of its large arrays. Neither counts Python's overhead: this is there
to stop what cannot fit, naming what is too large, not to predict the peak to the byte.

The limit is --max-memory (per rank), else the memory the kernel reports available
(MemAvailable) shared by the ranks of this node.
"""

import math
import os
import re

import numpy as np
from mpi4py import MPI

from mpitrain.comm import agree, local_rank_and_size
from mpitrain.errors import MpitrainError, error_of
from mpitrain.plan.cost import AutoChooser, config_spec, fullest_rank, rank_fields

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# Every rank builds these per dataset row: the validation split's permutation (int64) and mask
# (bool), the training and validation row lists (int64), and a sampler's epoch permutation (int64).
INDEX_BYTES_PER_ROW = 8 + 1 + 8 + 8


def parse_size(text: str) -> int:
    """'64G', '512MiB', '1.5g', '1000000' -> bytes (binary units); MpitrainError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise MpitrainError(f"--max-memory {text!r}: expected a positive size like 64G, 512M or 1000000 (bytes)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def describe(nbytes: float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, else free physical pages; None where neither is known."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# ---------------------------------------------------------------------------- the estimate


def model_bytes(config, widths: list[int], job_size: int) -> dict[str, float]:
    """{part: bytes} of the rank of a job of `job_size` ranks that holds the most: its parameters,
    gradients, optimizer state and the activations it keeps for backward, as `mpitrain plan`
    counts them for the layout of config's flags (plan/cost.py, the rules the metrics follow:
    ZeRO stages, pipeline schedules, parameter-server workers and servers). MpitrainError when a
    grid layout does not fit."""
    spec = config_spec(config, job_size, widths)
    # Where ranks sit and which all-reduce runs change the bytes sent, not what a rank holds: any
    # ranks per node and the built-in `auto` will do, and every rank stays off the tuning file
    # (the run reads it on one rank and broadcasts it).
    counted = rank_fields(spec, config, widths, ranks_per_node=job_size, choose=AutoChooser(tuned=False))
    parts = fullest_rank(counted)
    return {"parameters": parts["param"], "gradients": parts["grad"], "optimizer state": parts["optimizer"],
            "activations": parts["activation"]}


def data_bytes(config, rows: int, row_bytes: int, model_row_bytes: int, data_groups: int) -> dict[str, float]:
    """{part: bytes} of one rank's row indices and share of the rows (stored and as the model takes them)."""
    n_val = round(rows * config.val_fraction)
    in_memory = (rows - n_val) if config.sampler == "shard" else 0
    share = math.ceil((in_memory + n_val) / max(1, data_groups))
    return {"row indices": INDEX_BYTES_PER_ROW * rows, "data share": share * (row_bytes + model_row_bytes)}


def synthetic_bytes(config, widths: list[int]) -> dict[str, float]:
    """The synthetic set a node's first rank generates when there is no --data (float32 x, int64 y)."""
    return {"synthetic set": config.synth_samples * (4 * widths[0] + 8)}


# ---------------------------------------------------------------------------- the check


def check_memory(config, widths: list[int], comm: MPI.Intracomm, dataset=None, job_size: int | None = None) -> None:
    """Raise MpitrainError on every rank of comm when the estimate of one rank exceeds the limit.
    `dataset` (an open H5Dataset) adds the rows; without it and without --data, the synthetic set.
    job_size: ranks of the whole job when comm is a part of it (the parameter server's workers).
    Collective on comm."""
    _, ranks_on_node = local_rank_and_size(comm)
    agree(comm, error_of(_check, config, widths, dataset, job_size or comm.size, comm.size, ranks_on_node))


def _check(config, widths, dataset, job_size: int, comm_size: int, ranks_on_node: int) -> None:
    parts = model_bytes(config, widths, job_size)
    if dataset is not None:
        groups = comm_size if config.sync == "ps" else job_size // (config.tp * config.pp)
        y_bytes = dataset.y_width * dataset.y_dtype.itemsize if dataset.y_dtype is not None else 0
        row_bytes = dataset.n_features * dataset.x_dtype.itemsize + y_bytes
        model_row = dataset.n_features * np.dtype(config.dtype).itemsize + y_bytes
        parts.update(data_bytes(config, dataset.n_rows, row_bytes, model_row, groups))
    elif config.data is None:
        parts.update(synthetic_bytes(config, widths))
    if config.max_memory is not None:
        limit, source = parse_size(config.max_memory), f"--max-memory {config.max_memory}"
    else:
        available = available_bytes()
        if available is None:
            return
        limit = available // max(1, ranks_on_node)
        source = (f"{describe(available)} available on this node over {ranks_on_node} rank(s); "
                  "--max-memory sets the limit")
    total = sum(parts.values())
    if total <= limit:
        return
    largest = max(parts, key=parts.get)
    if largest in ("row indices", "data share"):
        what = f"{config.data}: {dataset.n_rows} rows of {dataset.n_features} features"
    elif largest == "synthetic set":
        what = f"--synth-samples {config.synth_samples} x {widths[0]} features"
    else:
        what = f"--model {config.model}"
    listed = ", ".join(f"{name} {describe(value)}" for name, value in parts.items() if value)
    raise MpitrainError(f"{what} needs about {describe(total)} per rank ({listed}), more than the limit of "
                        f"{describe(limit)} ({source})")
