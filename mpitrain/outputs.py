"""Every file mpitrain writes: checked before the work, written atomically, failures as one line.

    check_outputs(config, comm)                    # collective, before step 1: every output path is writable
    atomic_write(path, write)                      # write(h5py.File) to a private temporary, then rename over path
    atomic_write(path, write, binary=True)         # the same for a JSON or text file: write(binary file)

A temporary is created exclusively (O_CREAT | O_EXCL, which HDF5's mode "x" also uses) under an
unpredictable name in the target's folder, so a file or symlink someone planted at a name they
guessed is never opened, followed or left as the result; it is flushed and fsynced, renamed over
the target and the folder fsynced, so a crash mid-write never destroys what was saved before.
"""

import contextlib
import errno
import os
import re
import secrets

import h5py

from mpitrain.errors import MpitrainError


def reason(exc: BaseException) -> str:
    """'No space left on device': the system's words for an OSError, also when HDF5 only put its
    errno into the message text."""
    code = getattr(exc, "errno", None)
    if not code:
        found = re.search(r"errno = (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if code:
        return os.strerror(code)
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def write_error(path: str, exc: BaseException) -> MpitrainError:
    return MpitrainError(f"cannot write {path}: {reason(exc)}")


def _temporary_name(path: str) -> str:
    """.NAME.<random>.tmp next to path: hidden, so data and checkpoint listings skip it, and unguessable."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{secrets.token_hex(8)}.tmp")


def _fsync(path: str, folder: bool = False) -> None:
    handle = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else os.O_NOFOLLOW))
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def create_temporary(path: str, write, binary: bool = False) -> str:
    """A new temporary next to path holding what write(handle) put there; its name is returned so
    several ranks may add to it before publish(). Raises MpitrainError naming path."""
    temporary = _temporary_name(path)
    try:
        if binary:
            handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
            with os.fdopen(handle, "wb") as out:
                write(out)
        else:
            with h5py.File(temporary, "x") as out:
                write(out)
                out.flush()
        return temporary
    except OSError as exc:
        discard(temporary)
        raise write_error(path, exc) from None
    except BaseException:
        discard(temporary)
        raise


def publish(temporary: str, path: str) -> None:
    """fsync the temporary, rename it over path and fsync the folder; on failure the temporary is
    removed and path keeps what it held."""
    try:
        _fsync(temporary)
        os.replace(temporary, path)
        _fsync(os.path.dirname(os.path.abspath(path)), folder=True)
    except OSError as exc:
        discard(temporary)
        raise write_error(path, exc) from None


def discard(temporary: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(temporary)


def atomic_write(path: str, write, binary: bool = False) -> None:
    """write(h5py.File), or write(binary file) with binary=True, then replace path with the result
    in one rename. Raises MpitrainError `cannot write PATH: REASON`; an existing path is left intact."""
    publish(create_temporary(path, write, binary), path)


# ---------------------------------------------------------------------------- start-up checks


def probe_folder(folder: str, path: str) -> None:
    """Create and remove an empty exclusive file in folder: one test that catches a missing folder,
    a file where a folder should be, permissions and read-only mounts alike."""
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise MpitrainError(f"cannot write {path}: folder {folder} {what}")
    probe = _temporary_name(os.path.join(folder, "probe"))
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except OSError as exc:
        raise write_error(path, exc) from None
    discard(probe)


def check_file(path: str, make_folder: bool = False) -> None:
    """path can be written: not a folder, in a writable folder (made first with make_folder)."""
    if make_folder:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        except OSError as exc:
            raise write_error(path, exc) from None
    if os.path.isdir(path):
        raise MpitrainError(f"cannot write {path}: {os.strerror(errno.EISDIR)}")
    probe_folder(os.path.dirname(os.path.abspath(path)) or ".", path)
