"""Parameters and training checkpoints on disk, as HDF5, written atomically.

A parameter file holds one dataset per parameter (`0/weight`, `0/bias`, ...). A checkpoint holds
everything a run needs to continue: parameters (`model/0/weight`, ...), optimizer state
(`optimizer/m/0/weight`, ...), under --error-feedback the gradient-compression residual summed
over each data-parallel group (`residual/0/weight`, ...; meta 'residual': true), all unsliced
whatever the layout that wrote them, RNG states (`rng/...`, one row per rank), and a JSON record
of step, epoch, sampler position, layout and config, with a SHA-256 digest over all of it.
Because every array is unsliced, any layout can read the slices it needs (parallel/state.py)
from a checkpoint that any other layout wrote.

A write goes to an exclusive temporary with an unguessable name in the same folder, is flushed
and fsynced, then renamed over the target (and the folder fsynced), so a crash mid-write never
destroys what was saved before (mpitrain/outputs.py).
Loading reads plain numeric datasets and parses JSON: nothing from a file is ever unpickled or
evaluated.
"""

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass

import h5py
import numpy as np

from mpitrain.errors import MpitrainError
from mpitrain.h5 import open_read
from mpitrain.outputs import atomic_write


def atomic_h5_write(path: str, write) -> None:
    """Call write(h5py.File) on an exclusive temporary next to `path`, fsync it, then rename it to
    `path` (mpitrain/outputs.py, the one writer of every file mpitrain writes)."""
    atomic_write(path, write)


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
        with open_read(path) as handle:
            handle.visititems(visit)
    except OSError as exc:
        raise MpitrainError(f"{path}: not a readable HDF5 file ({exc})") from None
    return named


# ---------------------------------------------------------------------------- training checkpoints

FORMAT = "mpitrain-checkpoint"
VERSION = 2
_CHECKPOINT_NAME = re.compile(r"^ckpt-(\d{8,})\.h5$")


class CorruptCheckpoint(MpitrainError):
    """A checkpoint file that cannot be read back intact (truncated, damaged, or not a checkpoint)."""


@dataclass
class Checkpoint:
    """One training state: numeric arrays by path ("model/0/weight", "optimizer/m", ...) and a
    JSON-able `meta` dict (step, epoch, sampler position, config, ...)."""

    meta: dict
    arrays: dict[str, np.ndarray]


def checkpoint_name(step: int) -> str:
    """ckpt-00000120.h5: zero-padded so names sort by step."""
    return f"ckpt-{step:08d}.h5"


# A digest reads datasets in blocks of leading-axis rows of at most this many bytes, so verifying
# never holds more than one block, whatever a file declares.
DIGEST_BLOCK_BYTES = 64 << 20


def _digest(meta_json: str, arrays) -> str:
    """SHA-256 over the meta JSON and every array's name, dtype, shape and bytes, in name order.
    `arrays` maps names to arrays or to h5py datasets, read block by block (C order, so the bytes
    hashed are those of the whole array)."""
    digest = hashlib.sha256(meta_json.encode())
    for name in sorted(arrays):
        source = arrays[name]
        dtype, shape = np.dtype(source.dtype), tuple(source.shape)
        digest.update(f"\0{name}\0{dtype.str}\0{shape}\0".encode())
        if not shape:
            digest.update(np.ascontiguousarray(source[()]).view(np.uint8).reshape(-1))
            continue
        row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
        step = max(1, DIGEST_BLOCK_BYTES // row_bytes)
        for start in range(0, shape[0], step):
            block = np.ascontiguousarray(source[start:start + step])
            digest.update(block.view(np.uint8).reshape(-1) if block.size else b"")
    return digest.hexdigest()


def save_checkpoint(path: str, checkpoint: Checkpoint) -> None:
    """Write `checkpoint` atomically to `path` with its digest in the file attributes."""
    meta_json = json.dumps(checkpoint.meta, sort_keys=True)
    digest = _digest(meta_json, checkpoint.arrays)

    def write(handle):
        handle.attrs["format"] = FORMAT
        handle.attrs["version"] = VERSION
        handle.attrs["meta"] = meta_json
        handle.attrs["sha256"] = digest
        for name, array in checkpoint.arrays.items():
            handle.create_dataset(name, data=array)

    atomic_h5_write(path, write)


def _text_attr(handle, key: str, path: str) -> str:
    value = handle.attrs.get(key)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise CorruptCheckpoint(f"{path}: not an mpitrain checkpoint (attribute {key!r} missing or not text)")
    return value


def load_checkpoint(path: str, expected=None) -> Checkpoint:
    """Read a whole checkpoint after verify_checkpoint(path, expected); CorruptCheckpoint names the
    file and what is wrong."""
    meta, layout = verify_checkpoint(path, expected)
    try:
        with open_read(path, error=CorruptCheckpoint) as handle:
            arrays = {name: handle[name][()] for name in layout}
    except OSError as exc:
        raise CorruptCheckpoint(f"{path}: unreadable or truncated HDF5 file ({str(exc).splitlines()[0]})") from None
    return Checkpoint(meta, arrays)


def read_meta(path: str) -> dict:
    """A checkpoint's metadata (step, config, ...) without the digest check, which a resume does when
    it loads the file: enough to learn what run it belongs to. CorruptCheckpoint if it has none."""
    try:
        with open_read(path, error=CorruptCheckpoint) as handle:
            if not is_checkpoint(handle):
                raise CorruptCheckpoint(f"{path}: not an mpitrain checkpoint")
            return _parse_meta(_text_attr(handle, "meta", path), path)
    except OSError as exc:
        raise CorruptCheckpoint(f"{path}: unreadable or truncated HDF5 file ({str(exc).splitlines()[0]})") from None


def is_checkpoint(handle: h5py.File) -> bool:
    """Whether an open HDF5 file says it is an mpitrain checkpoint (any version)."""
    value = handle.attrs.get("format")
    return (value.decode("utf-8", "replace") if isinstance(value, bytes) else value) == FORMAT


# The RNG states a checkpoint holds, one row per rank of the job that wrote it (resilience.py):
# NumPy's MT19937 key and position and its cached Gaussian, Python's state and cached Gaussian.
RNG_ROWS = {"rng/numpy_key": ((624,), "u"), "rng/numpy_pos": ((), "i"), "rng/numpy_gauss": ((2,), "f"),
            "rng/python_state": ((625,), "i"), "rng/python_gauss": ((2,), "f")}


def buffer_prefix(buffer: str) -> str:
    """Where a buffer of the pieces (parallel/state.py) lies in a checkpoint: 'param' in model/, the
    error-feedback 'residual' in residual/, an optimizer buffer b in optimizer/b/."""
    return {"param": "model/", "residual": "residual/"}.get(buffer, f"optimizer/{buffer}/")


def holds_residual(meta: dict, path: str) -> bool:
    """Whether a checkpoint holds the error-feedback residual (meta 'residual'; files written before
    it was saved have no such field, and none)."""
    value = meta.get("residual", False)
    if not isinstance(value, bool):
        raise CorruptCheckpoint(f"{path}: checkpoint field 'residual' = {json.dumps(value)}: must be true or false")
    return value


def expected_datasets(shapes: dict[str, tuple], buffers, world_size: int,
                      residual: bool = False) -> dict[str, tuple[tuple, str]]:
    """{dataset: (shape, dtype kinds)} of a checkpoint of parameters of `shapes` ({name: shape}),
    optimizer `buffers` (and the residual, if it holds one), written by `world_size` ranks: what
    verify_checkpoint(expected=) takes."""
    expected = {}
    for buffer in ["param", *buffers, *(["residual"] if residual else [])]:
        expected.update({buffer_prefix(buffer) + name: (shape, "f") for name, shape in shapes.items()})
    expected.update({name: ((world_size, *row), kinds) for name, (row, kinds) in RNG_ROWS.items()})
    return expected


def _check_datasets(path: str, datasets: dict, expected: dict) -> None:
    """CorruptCheckpoint unless the file holds exactly the expected datasets, shapes and dtype kinds
    (read from the file's metadata, before any data)."""
    extra = sorted(set(datasets) - set(expected))
    if extra:
        item = datasets[extra[0]]
        raise CorruptCheckpoint(f"{path}: unexpected dataset '{extra[0]}' {tuple(item.shape)} {item.dtype} "
                                "(not part of this run's checkpoint)")
    missing = sorted(set(expected) - set(datasets))
    if missing:
        raise CorruptCheckpoint(f"{path}: checkpoint lacks {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}")
    for name, (shape, kinds) in expected.items():
        item = datasets[name]
        if tuple(item.shape) != tuple(shape):
            raise CorruptCheckpoint(f"{path}: '{name}' has shape {tuple(item.shape)}, expected {tuple(shape)}")
        if item.dtype.kind not in kinds:
            raise CorruptCheckpoint(f"{path}: '{name}' has dtype {item.dtype}, expected kind {kinds!r}")


def verify_checkpoint(path: str, expected=None) -> tuple[dict, dict[str, tuple[tuple, str]]]:
    """(meta, {dataset name: (shape, dtype str)}) of a checkpoint whose digest checks out, reading
    one block at a time; CorruptCheckpoint names the file and what is wrong. Readers then take
    only the slices they need (parallel/state.py).

    expected: {dataset: (shape, dtype kinds)} (see expected_datasets), or a function
    expected(path, meta) returning it, which may raise MpitrainError to refuse the checkpoint
    outright. With it, the file must hold exactly those datasets, checked before any data is read,
    so a file declaring a huge extra dataset is corrupt, not read. Without it, every dataset is
    hashed."""
    datasets: dict[str, h5py.Dataset] = {}

    def visit(name, item):
        if isinstance(item, h5py.Dataset):
            if item.dtype.kind not in "fiub":
                raise CorruptCheckpoint(f"{path}: dataset {name!r} has non-numeric dtype {item.dtype}")
            datasets[name] = item

    try:
        with open_read(path, error=CorruptCheckpoint) as handle:
            if _text_attr(handle, "format", path) != FORMAT:
                raise CorruptCheckpoint(f"{path}: not an mpitrain checkpoint (format {handle.attrs['format']!r})")
            version = handle.attrs.get("version")
            if not isinstance(version, (int, np.integer)) or int(version) != VERSION:
                raise CorruptCheckpoint(f"{path}: checkpoint format version {version!r}, this mpitrain reads {VERSION}")
            meta_json = _text_attr(handle, "meta", path)
            stored = _text_attr(handle, "sha256", path)
            meta = _parse_meta(meta_json, path)
            handle.visititems(visit)
            if expected is not None:
                _check_datasets(path, datasets, expected(path, meta) if callable(expected) else expected)
            if _digest(meta_json, datasets) != stored:
                raise CorruptCheckpoint(f"{path}: checksum mismatch: the file was damaged after it was written")
            layout = {name: (tuple(d.shape), d.dtype.str) for name, d in datasets.items()}
    except OSError as exc:
        raise CorruptCheckpoint(f"{path}: unreadable or truncated HDF5 file ({str(exc).splitlines()[0]})") from None
    return meta, layout


def _parse_meta(meta_json: str, path: str) -> dict:
    try:
        meta = json.loads(meta_json)
    except ValueError as exc:
        raise CorruptCheckpoint(f"{path}: malformed metadata ({exc})") from None
    if not isinstance(meta, dict):
        raise CorruptCheckpoint(f"{path}: metadata is not a JSON object")
    return meta


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """[(step, path)] of the checkpoint files in `folder`, oldest first; temporaries are not listed."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise MpitrainError(f"{folder}: cannot list the checkpoint folder ({exc.strerror})") from None
    found = [(int(match.group(1)), os.path.join(folder, name))
             for name in names if (match := _CHECKPOINT_NAME.match(name))]
    return sorted(found)


def newest_valid_checkpoint(folder: str, warn, expected=None) -> tuple[str, dict, dict] | None:
    """(path, meta, datasets) of the newest checkpoint in `folder` that verifies
    (verify_checkpoint(path, expected)), or None; warn(message) for each newer one that does not,
    so a write cut short by a crash (or a file that is not what it should be) costs one interval,
    not the run."""
    for _, path in reversed(list_checkpoints(folder)):
        try:
            return (path, *verify_checkpoint(path, expected))
        except CorruptCheckpoint as exc:
            warn(f"{exc}; trying the previous checkpoint")
    return None


def prune_checkpoints(folder: str, keep: int, written: str | None = None) -> list[str]:
    """Delete all but the newest `keep` checkpoints by step, never `written` (the file just saved,
    which counts as one of the `keep`), and the temporaries a killed writer left; return the
    deleted paths."""
    others = [path for _, path in list_checkpoints(folder) if written is None or not _same(path, written)]
    deleted = others[:max(len(others) - (keep - 1 if written else keep), 0)]
    deleted += [os.path.join(folder, name) for name in os.listdir(folder)
                if name.startswith(".ckpt-") and ".tmp" in name]
    for path in deleted:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return deleted


def _same(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


# ---------------------------------------------------------------------------- generator states


def rng_state() -> tuple:
    """This process's global NumPy and Python generator states. mpitrain draws from neither (its
    randomness is seeded per use), but code around it may, and a resume restores them."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return key, pos, has_gauss, gauss, internal, gauss_next


def rng_arrays(states: list[tuple]) -> dict[str, np.ndarray]:
    """One row per rank."""
    return {
        "rng/numpy_key": np.stack([s[0] for s in states]).astype(np.uint32),
        "rng/numpy_pos": np.array([s[1] for s in states], dtype=np.int64),
        "rng/numpy_gauss": np.array([[s[2], s[3]] for s in states], dtype=np.float64),
        "rng/python_state": np.array([s[4] for s in states], dtype=np.int64),
        "rng/python_gauss": np.array([[s[5] is not None, s[5] or 0.0] for s in states], dtype=np.float64),
    }


def set_rng_state(arrays: dict[str, np.ndarray], rank: int) -> None:
    if not all(name in arrays for name in rng_arrays([rng_state()])):
        return
    np.random.set_state(("MT19937", arrays["rng/numpy_key"][rank], int(arrays["rng/numpy_pos"][rank]),
                         int(arrays["rng/numpy_gauss"][rank, 0]), float(arrays["rng/numpy_gauss"][rank, 1])))
    has_gauss, gauss = arrays["rng/python_gauss"][rank]
    random.setstate((3, tuple(int(v) for v in arrays["rng/python_state"][rank]), float(gauss) if has_gauss else None))
