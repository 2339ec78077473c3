"""One HDF5 file, a directory of shards or a glob of shards, seen as one row-addressable dataset.

Every file holds inputs (default key `x`; any path, `train/images`) of shape (rows, d1, d2, ...),
read flattened to (rows, d1*d2*...), and labels (default `y`) of shape (rows, ...); shards are
concatenated in name order. Reads touch only the requested rows, so a rank that owns 1/world of the
rows reads 1/world of the bytes. Once set, `labels` (a labels.LabelFormat), `x_out_dtype` and
`normalizer` turn every read into what the model takes.
"""

import glob
import os

import h5py
import numpy as np

from mpitrain.comm.failure import agree
from mpitrain.data import chunks
from mpitrain.data.keys import numeric_datasets, suggest_keys
from mpitrain.data.labels import BadLabel, to_model
from mpitrain.errors import MpitrainError
from mpitrain.h5 import open_read

SHARD_SUFFIXES = (".h5", ".hdf5")

# Below this mean run length a contiguous shard's rows are read with one fancy-index call (a single
# H5Dread) rather than one slice read per run: each slice read pays a fixed h5py/HDF5 overhead, and
# measured with 784 float32 features (h5py 3.16) the fancy read wins for runs shorter than about 64
# rows. A chunked dataset is the other way round: HDF5 maps a many-block selection onto its chunks
# slowly (64 scattered rows from cached chunks: 2.2 ms fancy, 0.3 ms as 64 slice reads, HDF5 2.0),
# so chunked rows are always read run by run. Short runs go through __getitem__, long ones through
# read_direct (no temporary copy of a large block; slower per call: about 60 us against 15 us).
MIN_MEAN_RUN = 64
# Chunked rows are read in windows of whole chunks of at most this many bytes (bounds the temporary).
WINDOW_BYTES = 64 << 20


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


def open_file(path: str) -> h5py.File:
    """`path` opened read-only (the one way mpitrain opens files to read: mpitrain/h5.py), or an
    MpitrainError naming it."""
    return open_read(path)


def _missing(f, path, name):
    listed = ", ".join(f"{d.name.lstrip('/')} {d.shape} {d.dtype}" for d in numeric_datasets(f)[:12])
    hint = suggest_keys(f)
    hint = f"; try --x-key {hint[0]} --y-key {hint[1]}" if hint else ""
    return MpitrainError(f"{path}: missing dataset '{name}'; numeric datasets in the file: {listed or 'none'}{hint}")


def _dataset(f, path, name):
    try:
        node = f.get(name)
    except (OSError, RuntimeError, KeyError, ValueError) as err:
        raise MpitrainError(f"{path}: dataset '{name}' is unreadable ({_first_line(err)})") from err
    if not isinstance(node, h5py.Dataset):
        raise _missing(f, path, name)
    if node.dtype.kind not in "iuf":
        raise MpitrainError(f"{path}: dataset '{name}' has non-numeric dtype {node.dtype}")
    return node


def _validate(f, path, x_key, y_key):
    """(x, y or None) datasets of one open file after checking ranks, dtypes and row counts."""
    x = _dataset(f, path, x_key)
    y = _dataset(f, path, y_key) if y_key is not None else None
    if x.ndim < 2:
        raise MpitrainError(f"{path}: dataset '{x_key}' must be 2-D or more (rows, features...), got shape {x.shape}")
    if y is not None and y.ndim < 1:
        raise MpitrainError(f"{path}: dataset '{y_key}' must have a row axis, got shape {y.shape}")
    if y is not None and len(x) != len(y):
        raise MpitrainError(f"{path}: dataset '{x_key}' has {len(x)} rows but '{y_key}' has {len(y)}")
    return x, y


def _layout(x, y, x_key, y_key):
    """What must agree across shards: (dataset, property, value) triples."""
    found = [(x_key, "row shape", x.shape[1:]), (x_key, "dtype", x.dtype)]
    if y is not None:
        found += [(y_key, "dtype", y.dtype), (y_key, "row shape", y.shape[1:])]
    return found


def _check_same_layout(shards, paths, x_key, y_key):
    first = _layout(*shards[0], x_key, y_key)
    for (x, y), path in zip(shards[1:], paths[1:]):
        for (name, what, value), (_, _, expected) in zip(_layout(x, y, x_key, y_key), first):
            if value != expected:
                raise MpitrainError(
                    f"{path}: dataset '{name}' {what} {value} differs from {expected} in {paths[0]}")


def runs(rows):
    """Split sorted unique `rows` into maximal contiguous runs: (starts, stops) positions into rows."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return np.r_[0, breaks], np.r_[breaks, len(rows)]


class H5Dataset:
    """Rows 0..n_rows-1 over the shards of `path` in name order; x reads as (n_rows, n_features), y as
    stored, (n_rows, *y_row_shape), until `labels` is set. With y_key None there are no labels (x only).

    rereads: rows will be read again and again (--sampler global), so chunk caches hold whole
    datasets within the budget (see chunks.py). With `trace` set, every selection handed to h5py is
    appended to `selections` as (file_index, slice or sorted local row array, datasets read).
    """

    def __init__(self, path: str, x_key: str = "x", y_key: str | None = "y", rereads: bool = False):
        self.path = str(path)
        self.x_key, self.y_key = x_key, y_key
        self.paths = shard_paths(self.path)
        self.trace = False
        self.selections = []
        self.labels = None
        self.x_out_dtype = None
        self.normalizer = None
        self._files = []
        try:
            shards = []
            for shard_path in self.paths:
                self._files.append(open_file(shard_path))
                shards.append(_validate(self._files[-1], shard_path, x_key, y_key))
            _check_same_layout(shards, self.paths, x_key, y_key)
            self._x, self._y = self._with_caches(shards, rereads)
            self._blocks = chunks.BlockStore(self.cache_budget) if rereads else None
        except BaseException:
            self.close()
            raise
        self.offsets = np.cumsum([0] + [len(x) for x in self._x])
        self.n_rows = int(self.offsets[-1])
        if self.n_rows == 0:
            self.close()
            raise MpitrainError(f"{self.path}: dataset '{x_key}' has 0 rows")
        self.x_row_shape = self._x[0].shape[1:]
        self.n_features = int(np.prod(self.x_row_shape))
        self.x_dtype = self._x[0].dtype
        has_y = y_key is not None
        self.y_row_shape = self._y[0].shape[1:] if has_y else ()
        self.y_dtype = self._y[0].dtype if has_y else None
        self.y_width = int(np.prod(self.y_row_shape)) if has_y else 0
        self.is_classification = has_y and self.y_dtype.kind in "iu"

    def _with_caches(self, shards, rereads):
        """Every shard's (x, y) reopened, with a chunk cache sized to how its rows will be read.

        The files are closed and opened again: a dataset's cache is fixed at its first open.
        """
        flat = [d for pair in shards for d in pair if d is not None]
        sizes, self.cache_wanted, self.cache_budget = chunks.cache_sizes(flat, rereads)
        plan = [(d.name, n, chunks.chunk_bytes(d)) for d, n in zip(flat, sizes)]
        per_file = 1 if self.y_key is None else 2
        self.close()
        for shard_path in self.paths:
            self._files.append(open_file(shard_path))
        opened = iter(chunks.open_with_cache(self._files[i // per_file], name, n, per_chunk)
                      for i, (name, n, per_chunk) in enumerate(plan))
        pairs = [(next(opened), next(opened) if self.y_key is not None else None) for _ in shards]
        return [x for x, _ in pairs], [y for _, y in pairs]

    def reread_warning(self, local_batch: int) -> str | None:
        """The start-up warning when reading scattered rows again and again will decompress chunks repeatedly."""
        return chunks.reread_warning(self._x[0], self.path, self.cache_wanted, self.cache_budget, local_batch)

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
        try:
            for name, out in outputs:
                dataset = self._dataset(name, file_index)
                if isinstance(key, slice) and key.stop - key.start >= MIN_MEAN_RUN:
                    dataset.read_direct(out, key, dest)
                else:
                    out[dest] = dataset[key]
        except (OSError, RuntimeError) as err:
            names = "/".join(f"'{self._key(name)}'" for name, _ in outputs)
            raise MpitrainError(f"{self.paths[file_index]}: reading {names} failed ({_first_line(err)})") from err

    def _key(self, name):
        return self.x_key if name == "x" else self.y_key

    def _dataset(self, name: str, file_index: int) -> h5py.Dataset:
        """Shard file_index's dataset of column `name` ("x" or "y")."""
        return (self._x if name == "x" else self._y)[file_index]

    def _block_rows(self, name: str, file_index: int, block: int) -> slice:
        """Rows [start, stop) of chunk-row block `block` of a chunked shard's dataset `name`."""
        dataset = self._dataset(name, file_index)
        rows = dataset.chunks[0]
        return slice(block * rows, min((block + 1) * rows, len(dataset)))

    def _empty_block(self, name: str, file_index: int, block: int) -> np.ndarray:
        """An uninitialised array of chunk-row block `block`'s shape and dtype."""
        dataset, rows = self._dataset(name, file_index), self._block_rows(name, file_index, block)
        return np.empty((rows.stop - rows.start,) + dataset.shape[1:], dtype=dataset.dtype)

    def _load_block(self, name: str, file_index: int, block: int) -> np.ndarray:
        """One chunk-row block read (and decompressed) from the file."""
        holder = self._empty_block(name, file_index, block)
        self._read_into(file_index, self._block_rows(name, file_index, block), np.s_[:], [(name, holder)])
        return holder

    def _read_blocks(self, file_index, local, base, outputs):
        """Rows of a chunked shard gathered from whole chunk-row blocks, each read once (BlockStore)."""
        for name, out in outputs:
            blocks = local // self._dataset(name, file_index).chunks[0]
            # local is sorted, so each block's rows are one run of positions
            starts = np.flatnonzero(np.r_[True, blocks[1:] != blocks[:-1]])
            stops = np.r_[starts[1:], len(local)]
            for a, b in zip(starts.tolist(), stops.tolist()):
                block = int(blocks[a])
                rows = self._blocks.get((name, file_index, block),
                                        lambda block=block, name=name: self._load_block(name, file_index, block))
                out[base + a:base + b] = rows[local[a:b] - self._block_rows(name, file_index, block).start]

    def share_blocks(self, comm) -> None:
        """Decompress each chunk once per job instead of once per rank, where every rank will read
        rows from every chunk (--sampler global) and all of them fit the budget: rank i % p reads
        block i, then every block is broadcast from its reader into every rank's BlockStore.
        Collective on comm; a failed read raises MpitrainError on every rank alike."""
        if self._blocks is None or comm.size == 1 or self.cache_wanted > self.cache_budget:
            return
        keys = [(name, i, block) for i in range(len(self._x)) for name, column in (("x", self._x), ("y", self._y))
                if column[i] is not None and column[i].chunks is not None
                for block in range(-(-len(column[i]) // column[i].chunks[0]))]
        mine, error = {}, None
        try:
            for index in range(comm.rank, len(keys), comm.size):
                mine[keys[index]] = self._load_block(*keys[index])
        except MpitrainError as exc:
            error = exc
        agree(comm, error)
        for index, key in enumerate(keys):
            block = mine[key] if key in mine else self._empty_block(*key)
            comm.Bcast(block, root=index % comm.size)
            self._blocks.get(key, lambda block=block: block)

    def _read_windows(self, file_index, local, base, outputs):
        """Rows of a chunked shard read once: windows of whole chunks (WINDOW_BYTES at most) read in
        one call each and the wanted rows taken from them where rows are dense (a shard's block with
        validation rows left out), one slice read per run where they are sparse."""
        row_bytes = max(1, self.n_features * self.x_dtype.itemsize)
        chunk_rows = self._x[file_index].chunks[0]
        window = max(chunk_rows, WINDOW_BYTES // row_bytes // chunk_rows * chunk_rows)
        edges = np.searchsorted(local, np.arange(local[0] // window * window, local[-1] + window, window))
        for a, b in zip(edges[:-1].tolist(), edges[1:].tolist()):
            if b == a:
                continue
            part, span = local[a:b], slice(int(local[a]), int(local[b - 1]) + 1)
            if 4 * len(part) < span.stop - span.start:
                starts, stops = runs(part)
                for c, d in zip(starts.tolist(), stops.tolist()):
                    self._read_into(file_index, slice(int(part[c]), int(part[d - 1]) + 1),
                                    np.s_[base + a + c:base + a + d], outputs)
                continue
            holders = [(name, np.empty((span.stop - span.start,) + out.shape[1:], dtype=out.dtype))
                       for name, out in outputs]
            self._read_into(file_index, span, np.s_[:], holders)
            for (_, out), (_, holder) in zip(outputs, holders):
                out[base + a:base + b] = holder[part - span.start]

    def _read_shard(self, file_index, local, base, outputs):
        if self._blocks is not None:
            chunked = [(name, out) for name, out in outputs if self._dataset(name, file_index).chunks is not None]
            self._read_blocks(file_index, local, base, chunked)
            outputs = [(name, out) for name, out in outputs if self._dataset(name, file_index).chunks is None]
            if not outputs:
                return
        if self._x[file_index].chunks is not None:
            self._read_windows(file_index, local, base, outputs)
            return
        starts, stops = runs(local)
        contiguous = self._x[file_index].chunks is None
        if contiguous and len(starts) > 1 and len(local) < MIN_MEAN_RUN * len(starts):
            self._read_into(file_index, local, np.s_[base:base + len(local)], outputs)
            return
        for a, b in zip(starts.tolist(), stops.tolist()):
            self._read_into(file_index, slice(int(local[a]), int(local[b - 1]) + 1),
                            np.s_[base + a:base + b], outputs)

    def _read_rows(self, rows, names):
        """{name: dataset[rows]} as stored (x not yet flattened) for names in ("x", "y"), touching only those rows."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise ValueError(f"rows must be 1-D, got shape {rows.shape}")
        if len(rows) > 1 and not np.all(rows[1:] > rows[:-1]):
            unique, inverse = np.unique(rows, return_inverse=True)
            return {name: out[inverse] for name, out in self._read_rows(unique, names).items()}
        if len(rows) and (rows[0] < 0 or rows[-1] >= self.n_rows):
            raise IndexError(f"{self.path}: rows must lie in [0, {self.n_rows}), got {rows[0]}..{rows[-1]}")
        shapes = {"x": ((len(rows),) + self.x_row_shape, self.x_dtype),
                  "y": ((len(rows),) + self.y_row_shape, self.y_dtype)}
        outputs = [(name, np.empty(*shapes[name])) for name in names]
        cuts = np.searchsorted(rows, self.offsets)
        for file_index in range(len(self._x)):
            lo, hi = int(cuts[file_index]), int(cuts[file_index + 1])
            if hi > lo:
                local = rows[lo:hi] - self.offsets[file_index]
                self._read_shard(file_index, local, lo, outputs)
        return dict(outputs)

    def _model_x(self, x):
        """Stored rows -> (B, n_features), in x_out_dtype, normalized when a normalizer is set."""
        x = x.reshape(len(x), self.n_features)
        if self.x_out_dtype is not None:
            x = x.astype(self.x_out_dtype, copy=False)
        if self.normalizer is not None:
            x = self.normalizer.apply(x)
        return x

    def _model_y(self, y, rows):
        """Stored labels -> model labels (labels.to_model) once `labels` is set; errors name file and row."""
        if self.labels is None:
            return y
        try:
            return to_model(y, self.labels)
        except BadLabel as bad:
            path, row = self.locate(int(rows[bad.position]))
            raise MpitrainError(f"{path}: row {row} of dataset '{self.y_key}': {bad}") from None

    def rows_read(self, dataset: str = "x") -> np.ndarray:
        """Sorted global row ids of every selection of `dataset` handed to h5py while `trace` was on."""
        parts = [(np.arange(key.start, key.stop) if isinstance(key, slice) else np.asarray(key)) + self.offsets[index]
                 for index, key, names in self.selections if dataset in names]
        return np.sort(np.concatenate(parts)) if parts else np.array([], dtype=np.int64)

    def locate(self, row: int) -> tuple[str, int]:
        """(shard file, row within that file) of global row `row`: what an error message names."""
        file_index = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return self.paths[file_index], int(row - self.offsets[file_index])

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(x[rows] (B, n_features), y[rows]) as numpy arrays, touching only those rows; y is None
        without a y_key.

        Rows are coalesced into contiguous runs, one hyperslab read per run, or one fancy-index read per
        shard when runs are many and short. Unsorted or repeated rows are served from a sorted unique read.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if self.y_key is None:
            return self.read_x(rows), None
        columns = self._read_rows(rows, ("x", "y"))
        return self._model_x(columns["x"]), self._model_y(columns["y"], rows)

    def read_stored(self, rows: np.ndarray, name: str) -> np.ndarray:
        """x or y (`name`) at `rows` exactly as stored: x not flattened, labels not converted."""
        return self._read_rows(rows, (name,))[name]

    def read_x(self, rows: np.ndarray) -> np.ndarray:
        """x[rows] alone, (B, n_features), read like `read`."""
        return self._model_x(self._read_rows(rows, ("x",))["x"])

    def read_y(self, rows: np.ndarray) -> np.ndarray:
        """y[rows] alone, read like `read` (to check labels without touching x)."""
        rows = np.asarray(rows, dtype=np.int64)
        return self._model_y(self._read_rows(rows, ("y",))["y"], rows)

    def read_labels(self, chunk_rows: int = 1 << 20) -> np.ndarray:
        """The whole y column, read in chunks of `chunk_rows` rows (for stratified partitioning)."""
        y_out = np.empty((self.n_rows,) + self.y_row_shape, dtype=self.y_dtype)
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
                        f"{self.paths[file_index]}: reading '{self.y_key}' failed ({_first_line(err)})") from err
        return self._model_y(y_out, np.arange(self.n_rows))
