"""One HDF5 file, a directory of shards or a glob of shards, seen as one row-addressable dataset.

Every file holds `x` (rows, features) and `y` (rows,) or (rows, outputs); shards are concatenated in
name order. Reads touch only the requested rows, so a rank that owns 1/world of the rows reads
1/world of the bytes.
"""

import glob
import os

import h5py
import numpy as np

from mpitrain.errors import MpitrainError

SHARD_SUFFIXES = (".h5", ".hdf5")

# Below this mean run length a shard's rows are read with one fancy-index call (a single H5Dread) rather
# than one slice read per run: each slice read pays a fixed h5py/HDF5 overhead, and measured with
# 784 float32 features (h5py 3.16) the fancy read wins for runs shorter than about 64 rows.
MIN_MEAN_RUN = 64


def shard_paths(path: str) -> list[str]:
    """The files behind `path`: itself, the *.h5/*.hdf5 files of a directory, or a glob's matches (sorted)."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith(SHARD_SUFFIXES))
        if not names:
            raise MpitrainError(f"{path}: directory has no *.h5 or *.hdf5 files")
        return [os.path.join(path, n) for n in names]
    if os.path.exists(path):
        return [path]
    if glob.has_magic(path):
        matches = sorted(p for p in glob.glob(path) if os.path.isfile(p))
        if not matches:
            raise MpitrainError(f"{path}: pattern matches no files")
        return matches
    raise MpitrainError(f"{path}: no such file or directory")


def _first_line(err):
    text = str(err)
    return text.splitlines()[0] if text else type(err).__name__


def _open(path):
    # locking=False: shared parallel filesystems (NFS, some Lustre mounts) refuse HDF5's flock, and
    # read-only opens by many ranks need no lock.
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as err:
        raise MpitrainError(f"{path}: not a readable HDF5 file ({_first_line(err)})") from err


def _dataset(f, path, name):
    try:
        node = f.get(name)
    except (OSError, RuntimeError, KeyError) as err:
        raise MpitrainError(f"{path}: dataset '{name}' is unreadable ({_first_line(err)})") from err
    if not isinstance(node, h5py.Dataset):
        raise MpitrainError(f"{path}: missing dataset '{name}'")
    if node.dtype.kind not in "iuf":
        raise MpitrainError(f"{path}: dataset '{name}' has non-numeric dtype {node.dtype}")
    return node


def _validate(f, path):
    """(x, y) datasets of one open file after checking ranks, dtypes and row counts."""
    x, y = _dataset(f, path, "x"), _dataset(f, path, "y")
    if x.ndim != 2:
        raise MpitrainError(f"{path}: dataset 'x' must be 2-D (rows, features), got shape {x.shape}")
    if y.ndim not in (1, 2):
        raise MpitrainError(f"{path}: dataset 'y' must be 1-D or 2-D (rows, outputs), got shape {y.shape}")
    if len(x) != len(y):
        raise MpitrainError(f"{path}: dataset 'x' has {len(x)} rows but 'y' has {len(y)}")
    return x, y


def _layout(x, y):
    """What must agree across shards: (dataset, property, value) triples."""
    return [("x", "features", x.shape[1]), ("x", "dtype", x.dtype),
            ("y", "dtype", y.dtype), ("y", "row shape", y.shape[1:])]


def _check_same_layout(shards, paths):
    first = _layout(*shards[0])
    for (x, y), path in zip(shards[1:], paths[1:]):
        for (name, what, value), (_, _, expected) in zip(_layout(x, y), first):
            if value != expected:
                raise MpitrainError(
                    f"{path}: dataset '{name}' {what} {value} differs from {expected} in {paths[0]}")


def runs(rows):
    """Split sorted unique `rows` into maximal contiguous runs: (starts, stops) positions into rows."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return np.r_[0, breaks], np.r_[breaks, len(rows)]


class H5Dataset:
    """Rows 0..n_rows-1 over the shards of `path` in name order; x is (n_rows, n_features), y is
    (n_rows,) or (n_rows, y_width). With `trace` set, every selection handed to h5py is appended to
    `selections` as (file_index, slice or sorted local row array, datasets read), so tests can see what was read."""

    def __init__(self, path: str):
        self.path = str(path)
        self.paths = shard_paths(self.path)
        self.trace = False
        self.selections = []
        self._files = []
        try:
            shards = []
            for shard_path in self.paths:
                self._files.append(_open(shard_path))
                shards.append(_validate(self._files[-1], shard_path))
            _check_same_layout(shards, self.paths)
        except BaseException:
            self.close()
            raise
        self._x = [x for x, _ in shards]
        self._y = [y for _, y in shards]
        self.offsets = np.cumsum([0] + [len(x) for x in self._x])
        self.n_rows = int(self.offsets[-1])
        if self.n_rows == 0:
            self.close()
            raise MpitrainError(f"{self.path}: dataset 'x' has 0 rows")
        self.n_features = self._x[0].shape[1]
        self.x_dtype = self._x[0].dtype
        self.y_dtype = self._y[0].dtype
        self.y_width = 1 if self._y[0].ndim == 1 else self._y[0].shape[1]
        self.is_classification = self.y_dtype.kind in "iu"

    def __len__(self):
        return self.n_rows

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for f in self._files:
            f.close()
        self._files = []

    def _read_into(self, file_index, key, dest, outputs):
        """out[dest] = dataset[key] for each (name, out) of one shard; key is a slice or sorted index array."""
        if self.trace:
            self.selections.append((file_index, key, tuple(name for name, _ in outputs)))
        columns = {"x": self._x, "y": self._y}
        try:
            for name, out in outputs:
                dataset = columns[name][file_index]
                if isinstance(key, slice):
                    dataset.read_direct(out, key, dest)
                else:
                    out[dest] = dataset[key]
        except (OSError, RuntimeError) as err:
            names = "/".join(f"'{name}'" for name, _ in outputs)
            raise MpitrainError(f"{self.paths[file_index]}: reading {names} failed ({_first_line(err)})") from err

    def _read_shard(self, file_index, local, base, outputs):
        starts, stops = runs(local)
        if len(starts) > 1 and len(local) < MIN_MEAN_RUN * len(starts):
            self._read_into(file_index, local, np.s_[base:base + len(local)], outputs)
            return
        for a, b in zip(starts.tolist(), stops.tolist()):
            self._read_into(file_index, slice(int(local[a]), int(local[b - 1]) + 1),
                            np.s_[base + a:base + b], outputs)

    def _read_rows(self, rows, names):
        """{name: dataset[rows]} for names in ("x", "y"), touching only those rows."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise ValueError(f"rows must be 1-D, got shape {rows.shape}")
        if len(rows) > 1 and not np.all(rows[1:] > rows[:-1]):
            unique, inverse = np.unique(rows, return_inverse=True)
            return {name: out[inverse] for name, out in self._read_rows(unique, names).items()}
        if len(rows) and (rows[0] < 0 or rows[-1] >= self.n_rows):
            raise IndexError(f"{self.path}: rows must lie in [0, {self.n_rows}), got {rows[0]}..{rows[-1]}")
        shapes = {"x": ((len(rows), self.n_features), self.x_dtype),
                  "y": ((len(rows),) + self._y[0].shape[1:], self.y_dtype)}
        outputs = [(name, np.empty(*shapes[name])) for name in names]
        cuts = np.searchsorted(rows, self.offsets)
        for file_index in range(len(self._x)):
            lo, hi = int(cuts[file_index]), int(cuts[file_index + 1])
            if hi > lo:
                local = rows[lo:hi] - self.offsets[file_index]
                self._read_shard(file_index, local, lo, outputs)
        return dict(outputs)

    def rows_read(self, dataset: str = "x") -> np.ndarray:
        """Sorted global row ids of every selection of `dataset` handed to h5py while `trace` was on."""
        parts = [(np.arange(key.start, key.stop) if isinstance(key, slice) else np.asarray(key)) + self.offsets[index]
                 for index, key, names in self.selections if dataset in names]
        return np.sort(np.concatenate(parts)) if parts else np.array([], dtype=np.int64)

    def locate(self, row: int) -> tuple[str, int]:
        """(shard file, row within that file) of global row `row`: what an error message names."""
        file_index = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return self.paths[file_index], int(row - self.offsets[file_index])

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x[rows], y[rows]) as numpy arrays, touching only those rows.

        Rows are coalesced into contiguous runs, one hyperslab read per run, or one fancy-index read per
        shard when runs are many and short. Unsorted or repeated rows are served from a sorted unique read.
        """
        columns = self._read_rows(rows, ("x", "y"))
        return columns["x"], columns["y"]

    def read_y(self, rows: np.ndarray) -> np.ndarray:
        """y[rows] alone, read like `read` (to check labels without touching x)."""
        return self._read_rows(rows, ("y",))["y"]

    def read_labels(self, chunk_rows: int = 1 << 20) -> np.ndarray:
        """The whole y column, read in chunks of `chunk_rows` rows (for stratified partitioning)."""
        y_out = np.empty((self.n_rows,) + self._y[0].shape[1:], dtype=self.y_dtype)
        for file_index, y in enumerate(self._y):
            base = int(self.offsets[file_index])
            for a in range(0, len(y), chunk_rows):
                key = slice(a, min(a + chunk_rows, len(y)))
                if self.trace:
                    self.selections.append((file_index, key, ("y",)))
                try:
                    y.read_direct(y_out, key, np.s_[base + key.start:base + key.stop])
                except (OSError, RuntimeError) as err:
                    raise MpitrainError(
                        f"{self.paths[file_index]}: reading 'y' failed ({_first_line(err)})") from err
        return y_out
