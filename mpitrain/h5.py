"""The one way mpitrain opens an HDF5 file for reading: data files, parameter files, checkpoints.

Read-only opens go without HDF5's file lock (locking=False): shared parallel file systems (NFS,
some Lustre mounts) refuse flock, read-only opens by many ranks need none, and HDF5 refuses to
open one file twice in a process with different lock settings ("file locking flag values don't
match"), which is what a run reading the same file as --data and --init-from would hit if its
readers opened it in different ways.
"""

import h5py

from mpitrain.errors import MpitrainError


def open_read(path: str, what: str = "", error: type = MpitrainError) -> h5py.File:
    """`path` opened read-only; otherwise MpitrainError naming `what` (a flag, like '--init-from ')
    and the file, with `error` (a subclass) for a file that exists but is not readable HDF5."""
    try:
        return h5py.File(path, "r", locking=False)
    except FileNotFoundError:
        raise MpitrainError(f"{what}{path}: file not found") from None
    except IsADirectoryError:
        raise MpitrainError(f"{what}{path}: is a directory, not an HDF5 file") from None
    except OSError as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"{what}{path}: not a readable HDF5 file ({text})") from None
