"""One on-disk layout for every run layout: full, unsliced arrays named as the whole model names them.

A rank's holdings are *pieces*: (parameter name, index into the unsliced parameter, {buffer:
local view}) with buffers 'param', the optimizer's ('m', 'v', 'velocity') and, when a checkpoint of
--error-feedback is written or read, 'residual' (summed over the data-parallel group, see
GridStrategy.residual_sum). An index is a tuple
of slices (a tensor-parallel shard, or everything), or ('flat', a, b) for a range of the raveled
parameter (a parameter server's range of the flat buffer).

Saving gathers the pieces of one copy of the model (ranks with holds_copy) to rank 0, which lays
them into unsliced arrays: a file written under --tp 2 --pp 2 is the file a one-process run
writes. Loading goes the other way: every rank reads only its pieces' hyperslabs.
"""

import json
from types import SimpleNamespace

import h5py
import numpy as np
from mpi4py import MPI

from mpitrain.backend import to_host
from mpitrain.checkpoint import (CorruptCheckpoint, expected_datasets, holds_residual, is_checkpoint, save_parameters,
                                 verify_checkpoint)
from mpitrain.comm import agree
from mpitrain.config import as_dict
from mpitrain.data import normalize
from mpitrain.errors import MpitrainError, error_of
from mpitrain.h5 import open_read
from mpitrain.nn.model import full_shapes
from mpitrain.optim import buffer_names

_TAG_PIECE = 71


def param_pieces(model) -> list[tuple[str, tuple, dict]]:
    """The pieces of a whole model's parameters alone (no optimizer state), e.g. to --init-from it."""
    return [(name, index, {"param": view}) for name, index, view, _ in model.shards()]


def range_pieces(shards, widths: list[int], start: int, stop: int, params, state: dict) -> list[tuple[str, tuple, dict]]:
    """The pieces of the flat range [start, stop) of a model's buffers (a sharded optimizer's part).

    shards: Model.shards(); params: the whole flat parameter buffer; state: {name: buffer of
    stop - start entries} (the optimizer's). A range of a local weight shard (r, c) is at most three
    rectangles of the unsliced weight (the rest of a first row, whole rows, the start of a last
    row), so the pieces are tuple-of-slices keys and the checkpoint stays the layout-independent
    file, read and written by hyperslab."""
    shapes, out = full_shapes(widths), []
    for name, index, view, (first, last) in shards:
        lo, hi = max(first, start) - first, min(last, stop) - first
        if lo >= hi:
            continue
        origin = [part.indices(dim)[0] for part, dim in zip(index, shapes[name])]
        cols = view.shape[-1]
        rects = []
        if view.ndim == 1:
            rects.append((lo, hi, (slice(origin[0] + lo, origin[0] + hi),)))
        else:
            while lo < hi:
                row, col = divmod(lo, cols)
                if col or hi - lo < cols:  # the rest of one row, or the start of the last
                    rows = 1
                    take = width = min(cols - col, hi - lo)
                else:  # whole rows
                    rows, width = (hi - lo) // cols, cols
                    take = rows * cols
                rects.append((lo, lo + take, (slice(origin[0] + row, origin[0] + row + rows),
                                              slice(origin[1] + col, origin[1] + col + width))))
                lo += take
        for a, b, key in rects:
            shape = tuple(part.stop - part.start for part in key)
            views = {"param": params[first + a:first + b].reshape(shape)}
            for buffer, flat in state.items():
                views[buffer] = flat[first + a - start:first + b - start].reshape(shape)
            out.append((name, key, views))
    return out


def _flat_rows(key, shape) -> tuple[slice, int, int]:
    """For a ('flat', a, b) key of a parameter of `shape`: the leading-axis rows covering [a, b)
    and where [a, b) starts and stops within those rows, raveled."""
    _, a, b = key
    per_row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    first, last = a // per_row, -(-b // per_row)
    return slice(first, last), a - first * per_row, b - first * per_row


def read_piece(dataset, key) -> np.ndarray:
    """dataset[key] for an unsliced-index key, reading only that hyperslab (h5py dataset or array)."""
    if key and key[0] == "flat":
        rows, start, stop = _flat_rows(key, dataset.shape)
        return np.asarray(dataset[rows]).reshape(-1)[start:stop]
    return np.asarray(dataset[key])


def write_piece(full: np.ndarray, key, array) -> None:
    if key and key[0] == "flat":
        full.reshape(-1)[key[1]:key[2]] = np.asarray(array).reshape(-1)
    else:
        full[key] = array


def gather_pieces(pieces, buffers: list[str], holds_copy: bool, widths: list[int], dtype,
                  comm: MPI.Intracomm) -> dict[str, dict[str, np.ndarray]] | None:
    """{buffer: {name: unsliced host array}} on rank 0 of comm (None elsewhere), from the pieces of
    every rank with holds_copy. Collective on comm.

    Piece descriptions travel as small Python objects; the arrays as raw buffers, rank by rank, so
    rank 0 holds one message's worth beyond the result. A rank whose copy rank 0 already holds
    (holds_copy False) sends nothing: under pure data parallelism that is every rank but 0.
    """
    mine = [(name, key, tuple(views["param"].shape)) for name, key, views in pieces] if holds_copy else []
    described = comm.gather(mine, root=0)
    if comm.rank != 0:
        for name, key, views in (pieces if holds_copy else []):
            for buffer in buffers:
                comm.Send(np.ascontiguousarray(to_host(views[buffer])), dest=0, tag=_TAG_PIECE)
        return None
    shapes = full_shapes(widths)
    full = {buffer: {name: np.zeros(shape, dtype=dtype) for name, shape in shapes.items()} for buffer in buffers}
    for name, key, views in (pieces if holds_copy else []):
        for buffer in buffers:
            write_piece(full[buffer][name], key, to_host(views[buffer]))
    for source in range(1, comm.size):
        for name, key, shape in described[source]:
            for buffer in buffers:
                incoming = np.empty(shape, dtype=dtype)
                comm.Recv(incoming, source=source, tag=_TAG_PIECE)
                write_piece(full[buffer][name], key, incoming)
    return full


def full_parameters(strategy, widths: list[int], dtype, comm: MPI.Intracomm) -> dict[str, np.ndarray]:
    """{name: unsliced host array} on every rank of comm. Collective."""
    full = gather_pieces(strategy.pieces(), ["param"], strategy.holds_copy, widths, dtype, comm)
    params = full["param"] if full is not None else None
    if comm.size == 1:
        return params
    names = list(full_shapes(widths))
    if comm.rank != 0:
        params = {name: np.empty(shape, dtype=dtype) for name, shape in full_shapes(widths).items()}
    for name in names:
        comm.Bcast(params[name], root=0)
    return params


def save_model(config, parameters: dict[str, np.ndarray] | None, path: str, comm: MPI.Intracomm) -> None:
    """Rank 0 writes `parameters` ({name: unsliced host array}; only rank 0's are read) to the model
    file `path` (--save, --save-best), with the model's attributes, its config as JSON and the
    --normalize statistics, atomically; every rank learns whether the write worked. Collective."""
    error = None
    if comm.rank == 0:
        attrs = {"model": config.model, "activation": config.activation, "config": json.dumps(as_dict(config))}
        stats, stats_attrs = normalize.file_entries(normalize.attached(config))
        error = error_of(save_parameters, path, {**parameters, **stats}, {**attrs, **stats_attrs})
    agree(comm, error)


def load_pieces(pieces, source, buffers: dict[str, str]) -> None:
    """views[buffer] <- read_piece(source[prefix + name], key) for every piece and every
    (buffer, prefix) in `buffers`; `source` is an open h5py.File (or a dict of arrays)."""
    for name, key, views in pieces:
        for buffer, prefix in buffers.items():
            view = views[buffer]
            xp_array = np.asarray(read_piece(source[prefix + name], key)).reshape(view.shape)
            view[...] = _like(view, xp_array)


def _like(view, host: np.ndarray):
    """host converted to view's array module and dtype (CuPy views take a device copy)."""
    if isinstance(view, np.ndarray):
        return host.astype(view.dtype, copy=False)
    import cupy

    return cupy.asarray(host, dtype=view.dtype)


def check_parameter_file(handle: h5py.File, path: str, widths: list[int], prefix: str = "") -> None:
    """The file holds every parameter of the model with its unsliced shape, as floats."""
    for name, shape in full_shapes(widths).items():
        item = handle.get(prefix + name)
        if not isinstance(item, h5py.Dataset):
            raise MpitrainError(f"{path}: no dataset '{prefix + name}' for --model {'-'.join(map(str, widths))}")
        if item.shape != shape:
            raise MpitrainError(f"{path}: '{prefix + name}' has shape {item.shape} but --model "
                                f"{'-'.join(map(str, widths))} needs {shape}")
        if item.dtype.kind != "f":
            raise MpitrainError(f"{path}: '{prefix + name}' has dtype {item.dtype}, not a float")


def _checkpoint_datasets(path: str, meta: dict, widths: list[int]) -> dict:
    """What a checkpoint written for this model holds, from its metadata (optimizer, world size,
    residual): any other dataset makes it corrupt, before anything is read."""
    optimizer, config = meta.get("optimizer"), meta.get("config")
    world_size = meta.get("world_size")
    if not (isinstance(optimizer, dict) and isinstance(config, dict) and type(world_size) is int and world_size > 0):
        raise CorruptCheckpoint(f"{path}: checkpoint metadata lacks its optimizer, config or world size")
    settings = SimpleNamespace(optimizer=optimizer.get("kind"), momentum=config.get("momentum"))
    return expected_datasets(full_shapes(widths), buffer_names(settings), world_size, holds_residual(meta, path))


def init_from(path: str, pieces, widths: list[int], comm: MPI.Intracomm) -> None:
    """--init-from: copy this rank's pieces of the parameters from a --save file or a checkpoint
    (its 'model/' group; the digest is verified first). Every rank reads only its hyperslabs and
    every rank raises alike if any rank could not. Collective on comm."""
    error, prefix = None, ""
    try:
        with open_read(path, "--init-from ") as handle:
            if is_checkpoint(handle):
                prefix = "model/"
    except MpitrainError as exc:
        error = exc
    if error is None and prefix and comm.rank == 0:
        try:
            verify_checkpoint(path, lambda _, meta: _checkpoint_datasets(path, meta, widths))
        except MpitrainError as exc:
            error = MpitrainError(f"--init-from {exc}")
    agree(comm, error)
    try:
        with open_read(path, "--init-from ") as handle:
            check_parameter_file(handle, path, widths, prefix)
            load_pieces(pieces, handle, {"param": prefix})
    except MpitrainError as exc:
        error = exc
    except OSError as exc:
        error = MpitrainError(f"--init-from {path}: reading failed ({str(exc).splitlines()[0]})")
    agree(comm, error)
