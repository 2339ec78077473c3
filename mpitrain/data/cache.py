"""A cache in the shared temp folder that a neighbour cannot feed us.

The temp folder is writable by everyone, so a file found there at a predictable name may be
anyone's: a planted data set (every label 0) or a symlink to elsewhere. A cached file is used only
when it lies in this user's private folder, is a regular file of this user that no one else may
write, and matches the SHA-256 digest stored beside it (NAME.sha256, written after it); otherwise
the caller regenerates it.
"""

import hashlib
import os
import stat
import tempfile

from mpitrain.outputs import atomic_write

DIGEST_SUFFIX = ".sha256"


def private_folder() -> str:
    """TMP/mpitrain-<uid>, made 0700; when that name is held by anything else (someone may create
    it first, or plant a symlink), a fresh private folder from mkdtemp instead."""
    folder = os.path.join(tempfile.gettempdir(), f"mpitrain-{os.getuid()}")
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return tempfile.mkdtemp(prefix="mpitrain-")
    return folder if _private(os.lstat(folder), stat.S_ISDIR, 0o077) else tempfile.mkdtemp(prefix="mpitrain-")


def _private(info: os.stat_result, kind, others: int) -> bool:
    return kind(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & others


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes, read through a descriptor that refuses a symlink."""
    digest = hashlib.sha256()
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def trusted(path: str) -> bool:
    """Whether `path` and its digest are regular files of this user, writable by no one else, and
    the digest matches the file's bytes."""
    try:
        for name in (path, path + DIGEST_SUFFIX):
            if not _private(os.lstat(name), stat.S_ISREG, 0o022):
                return False
        with open(os.open(path + DIGEST_SUFFIX, os.O_RDONLY | os.O_NOFOLLOW), "rb") as handle:
            stored = handle.read(128).decode("ascii", "replace").strip()
        return stored == file_digest(path)
    except OSError:
        return False


def seal(path: str) -> None:
    """Make the just-written `path` readable by this user only and store its digest beside it."""
    os.chmod(path, 0o600, follow_symlinks=False)
    digest = file_digest(path)
    atomic_write(path + DIGEST_SUFFIX, lambda out: out.write(digest.encode() + b"\n"), binary=True)
    os.chmod(path + DIGEST_SUFFIX, 0o600, follow_symlinks=False)
