"""Parameters on disk: one HDF5 dataset per parameter (`0/weight`, `0/bias`, ...), written atomically.

A write goes to a temporary name in the same folder, is flushed and fsynced, then renamed over
the target, so a crash mid-write never destroys what was saved before. Loading reads plain
numeric datasets only: nothing from a file is ever unpickled or evaluated.
"""

import os

import h5py
import numpy as np

from mpitrain.errors import MpitrainError


def atomic_h5_write(path: str, write) -> None:
    """Call write(h5py.File) on a temporary file next to `path`, fsync it, then rename it to `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise MpitrainError(f"{path}: folder {folder} does not exist")
    temporary = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with h5py.File(temporary, "w") as handle:
            write(handle)
            handle.flush()
        with open(temporary, "rb") as raw:
            os.fsync(raw.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def save_parameters(path: str, named: dict[str, np.ndarray], attrs: dict | None = None) -> None:
    """Write {name: host array} as datasets named e.g. `0/weight`, with optional file attributes."""

    def write(handle):
        for name, array in named.items():
            handle.create_dataset(name, data=array, fletcher32=True)
        for key, value in (attrs or {}).items():
            handle.attrs[key] = value

    atomic_h5_write(path, write)


def load_parameters(path: str) -> dict[str, np.ndarray]:
    """Read every numeric dataset of a parameter file into {name: array}."""
    named: dict[str, np.ndarray] = {}

    def visit(name, item):
        if isinstance(item, h5py.Dataset):
            if item.dtype.kind not in "fiu":
                raise MpitrainError(f"{path}: dataset {name!r} has non-numeric dtype {item.dtype}")
            named[name] = item[()]

    try:
        with h5py.File(path, "r") as handle:
            handle.visititems(visit)
    except FileNotFoundError:
        raise MpitrainError(f"{path}: parameter file not found") from None
    except OSError as exc:
        raise MpitrainError(f"{path}: not a readable HDF5 file ({exc})") from None
    return named
