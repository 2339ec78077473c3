"""One model format for every layout: full, unsliced parameters named as a data-parallel run names them.

Saving gathers every shard to world rank 0 and lays it into the unsliced arrays (`0/weight` (in,
out), `0/bias`, ...), so a file written under --tp 2 --pp 2 is the file a one-process run writes.
Loading goes the other way: each rank reads only its shards' hyperslabs of the file.
"""

import h5py
import numpy as np
from mpi4py import MPI

from mpitrain.backend import to_host
from mpitrain.comm import agree
from mpitrain.errors import MpitrainError
from mpitrain.parallel.model import full_shapes, parameter_names


def gather_full_state(shards, holds_copy: bool, widths: list[int], dtype, comm: MPI.Intracomm) -> dict:
    """{name: unsliced host array} on every rank of comm, from each rank's (name, index, view) shards.

    Only ranks with holds_copy send (one data-parallel replica is enough); rank 0 assembles and
    broadcasts. Replicated parameters arrive from several ranks with the same values. Collective.
    """
    mine = [(name, index, to_host(view).copy()) for name, index, view in shards] if holds_copy else []
    everyone = comm.gather(mine, root=0)
    full = None
    if comm.rank == 0:
        full = {name: np.empty(shape, dtype=dtype) for name, shape in full_shapes(widths).items()}
        for pieces in everyone:
            for name, index, array in pieces:
                full[name][index] = array
    return comm.bcast(full, root=0)


def check_parameter_file(handle: h5py.File, path: str, widths: list[int]) -> None:
    """The file holds every parameter of the model with its unsliced shape (other datasets are ignored)."""
    for name, shape in full_shapes(widths).items():
        if name not in handle or not isinstance(handle[name], h5py.Dataset):
            raise MpitrainError(f"{path}: no dataset '{name}' for --model {'-'.join(map(str, widths))}")
        dataset = handle[name]
        if dataset.shape != shape:
            raise MpitrainError(f"{path}: '{name}' has shape {dataset.shape} but the model needs {shape}")
        if dataset.dtype.kind != "f":
            raise MpitrainError(f"{path}: '{name}' has dtype {dataset.dtype}, not a float")


def load_parameter_file(path: str, widths: list[int], load, comm: MPI.Intracomm) -> None:
    """Check `path` against the model, then call load((name, h5py dataset) pairs) to copy shards out.

    Every rank opens the file (reading only what `load` indexes) and every rank raises alike if
    any rank could not. Collective on comm.
    """
    error = None
    try:
        with h5py.File(path, "r") as handle:
            check_parameter_file(handle, path, widths)
            load((name, handle[name]) for name in parameter_names(widths))
    except MpitrainError as exc:
        error = exc
    except FileNotFoundError:
        error = MpitrainError(f"--init-from {path}: file not found")
    except OSError as exc:
        error = MpitrainError(f"--init-from {path}: not a readable HDF5 file ({exc})")
    agree(comm, error)


def load_whole_model(path: str, model, comm: MPI.Intracomm) -> None:
    """--init-from for a data-parallel nn.Sequential: every parameter read whole. Collective on comm."""

    def load(named):
        model.load_state({name: np.asarray(dataset[()]) for name, dataset in named})

    load_parameter_file(path, model.widths, load, comm)
