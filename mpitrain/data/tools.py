"""`mpitrain data inspect | import | split`: look at a data set, bring one in, cut one in two.

    mpitrain data inspect 'shards/*.h5'                          # datasets, chunks, labels, keys to use
    mpitrain data import digits.npz --out digits.h5              # .npy, .npz or CSV (label column last)
    mpitrain data import train.csv --label-column 0 --out train/ --shards 4 --compression lzf
    mpitrain data split digits.h5 --train train.h5 --test test.h5 --test-fraction 0.25 --stratify

One-process tools (rank 0 runs them). Written files hold `x` (rows, ...) and `y` (rows, ...), go to a
temporary name and are renamed into place, and an existing output is kept unless --force.
"""

import argparse
import os

import h5py
import numpy as np

from mpitrain.data import synth
from mpitrain.data.hdf5 import H5Dataset, open_file, shard_paths
from mpitrain.data.keys import KEY_PAIRS, numeric_datasets, suggest_keys
from mpitrain.data.labels import label_format, to_model
from mpitrain.data.partition import uniform
from mpitrain.errors import MpitrainError
from mpitrain.outputs import atomic_write, write_error

# Row reads fetch whole chunks: chunks of about this many bytes keep a scattered row read cheap
# (a 784-float32 row gives 20 rows per chunk) while compression still sees enough data.
TARGET_CHUNK_BYTES = 64 << 10
BLOCK_ROWS = 8192


def add_parsers(data_commands) -> None:
    """The inspect, import and split subcommands of `mpitrain data`."""
    inspect = data_commands.add_parser("inspect", help="datasets, shapes, chunking, labels, and the keys to train with")
    inspect.add_argument("path", metavar="FILE|DIR|GLOB")
    inspect.add_argument("--x-key", metavar="NAME", help="inputs dataset (default: guessed from the names)")
    inspect.add_argument("--y-key", metavar="NAME", help="labels dataset (default: guessed from the names)")

    imp = data_commands.add_parser("import", help="write .npy, .npz or CSV data as HDF5 laid out for row reads")
    imp.add_argument("source", metavar="FILE", help=".npy (inputs; labels with --labels), .npz or .csv")
    imp.add_argument("--out", required=True, metavar="FILE.h5", help="output file (a folder with --shards > 1)")
    imp.add_argument("--labels", metavar="FILE.npy", help="labels for a .npy source")
    imp.add_argument("--x-key", metavar="NAME", help="inputs array of an .npz (default: x, X, data, ...)")
    imp.add_argument("--y-key", metavar="NAME", help="labels array of an .npz (default: y, target, labels, ...)")
    imp.add_argument("--label-column", type=int, default=-1, metavar="I",
                     help="CSV column of the label, the rest are features (default -1: the last)")
    imp.add_argument("--shards", type=int, default=1, metavar="K", help="split into K files (default 1)")
    imp.add_argument("--compression", choices=("none", "gzip", "lzf"), default="none",
                     help="chunked and compressed, or contiguous (default none: contiguous)")
    imp.add_argument("--chunk-rows", type=int, metavar="N",
                     help=f"rows per chunk (default: about {TARGET_CHUNK_BYTES >> 10} KiB of rows; implies chunked)")
    imp.add_argument("--force", action="store_true", help="overwrite an existing --out")

    split = data_commands.add_parser("split", help="split into train and test files by a seeded shuffle")
    split.add_argument("source", metavar="FILE|DIR|GLOB")
    split.add_argument("--train", required=True, metavar="FILE.h5")
    split.add_argument("--test", required=True, metavar="FILE.h5")
    split.add_argument("--test-fraction", type=float, default=0.2, metavar="F", help="(default 0.2)")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--stratify", action="store_true", help="the same test fraction of every class")
    split.add_argument("--x-key", default="x", metavar="NAME")
    split.add_argument("--y-key", default="y", metavar="NAME")
    split.add_argument("--force", action="store_true", help="overwrite existing outputs")


def run(args: argparse.Namespace) -> None:
    if args.data_command == "inspect":
        print("\n".join(inspect(args.path, args.x_key, args.y_key)))
    elif args.data_command == "import":
        rows = import_file(args.source, args.out, labels=args.labels, x_key=args.x_key, y_key=args.y_key,
                           label_column=args.label_column, shards=args.shards, compression=args.compression,
                           chunk_rows=args.chunk_rows, force=args.force)
        print(f"wrote {rows} rows from {args.source} to {args.out}")
    else:
        n_train, n_test = split_file(args.source, args.train, args.test, args.test_fraction, args.seed,
                                     args.stratify, args.x_key, args.y_key, args.force)
        print(f"wrote {n_train} rows to {args.train} and {n_test} rows to {args.test}")


def refuse_overwrite(path: str, force: bool, flag: str = "--out") -> None:
    """Raise unless `path` is free or `force` is set."""
    if os.path.exists(path) and not force:
        raise MpitrainError(f"{flag} {path}: already exists; pass --force to overwrite it")


# ---------------------------------------------------------------------------- inspect


def _describe(node: h5py.Dataset) -> str:
    codec = f", {node.compression}" if node.compression else ""
    layout = f"chunks {node.chunks}{codec}" if node.chunks else "contiguous"
    return f"  {node.name.lstrip('/')}: shape {node.shape}, {node.dtype}, {layout}"


def label_summary(y: np.ndarray, outputs: int | None = None) -> str:
    """Class range and counts of labels that are class indices or one-hot; value ranges otherwise."""
    row_shape = y.shape[1:]
    classes = outputs or (row_shape[0] if len(row_shape) == 1 and row_shape[0] > 1 else None)
    if classes is None and y.size and np.all(np.isfinite(y)) and np.all(y == np.round(y)) and y.min() >= 0:
        classes = int(y.max()) + 1
    if classes is not None:
        try:
            labels = to_model(y, label_format(row_shape, y.dtype, "ce", classes))
            counts = np.bincount(labels, minlength=classes)
            kind = "one-hot" if row_shape not in ((), (1,)) else "class indices"
            return f"labels: {kind} in [0, {classes}), class counts {counts.tolist()}"
        except MpitrainError:
            pass
    flat = y.reshape(len(y), -1).astype(np.float64)
    return (f"labels: real-valued targets, {flat.shape[1]} output(s), min {flat.min(axis=0)[:4].tolist()}, "
            f"max {flat.max(axis=0)[:4].tolist()}")


def inspect(path: str, x_key: str | None = None, y_key: str | None = None) -> list[str]:
    """Lines describing every shard of `path` and whether (and how) mpitrain can train on it."""
    lines, guess = [], None
    for shard in shard_paths(path):
        with open_file(shard) as f:
            datasets = numeric_datasets(f)
            guess = guess or suggest_keys(f)
            key = x_key or (guess[0] if guess else None)
            rows = f"{len(f[key])} rows" if key and isinstance(f.get(key), h5py.Dataset) else ""
            lines.append(f"{shard}: {rows or f'{len(datasets)} numeric datasets'}")
            lines += [_describe(node) for node in datasets]
    x_key = x_key or (guess[0] if guess else "x")
    y_key = y_key or (guess[1] if guess else "y")
    try:
        with H5Dataset(path, x_key, y_key) as dataset:
            labels = dataset.read_labels()
            shards = f" in {len(dataset.paths)} files" if len(dataset.paths) > 1 else ""
            lines.append(f"{dataset.n_rows} rows{shards}, {dataset.n_features} features per row"
                         + (f" (rows of shape {dataset.x_row_shape}, read flattened)" if len(dataset.x_row_shape) > 1 else ""))
            lines.append(label_summary(labels))
            lines.append(f"works as mpitrain data: --data {path} --x-key {x_key} --y-key {y_key}")
    except MpitrainError as exc:
        lines.append(f"does not work as mpitrain data with --x-key {x_key} --y-key {y_key}: {exc}")
    return lines


# ---------------------------------------------------------------------------- writing


def chunk_rows_for(row_shape: tuple, dtype, n_rows: int) -> int:
    row_bytes = max(1, int(np.prod(row_shape)) * np.dtype(dtype).itemsize)
    return max(1, min(n_rows, TARGET_CHUNK_BYTES // row_bytes))


def write_rows(path: str, x, y, chunk_rows: int | None = None, compression: str | None = None) -> None:
    """Write x (n, ...) and y (n, ...) (arrays or memory maps) to `path` atomically, BLOCK_ROWS at a
    time; chunked by chunk_rows rows (and compressed) when either is given, contiguous otherwise."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as exc:
        raise write_error(path, exc) from None
    chunked = chunk_rows is not None or compression not in (None, "none")
    compression = None if compression in (None, "none") else compression

    def write(f):
        for key, array in (("x", x), ("y", y)):
            rows = chunk_rows or chunk_rows_for(array.shape[1:], array.dtype, len(array))
            layout = dict(chunks=(max(1, min(rows, len(array))),) + array.shape[1:],
                          compression=compression) if chunked and len(array) else {}
            out = f.create_dataset(key, shape=array.shape, dtype=array.dtype, **layout)
            for a in range(0, len(array), BLOCK_ROWS):
                out[a:a + BLOCK_ROWS] = array[a:a + BLOCK_ROWS]

    atomic_write(path, write)


def write_shards(path: str, x, y, shards: int, chunk_rows=None, compression=None) -> None:
    """One file, or `shards` contiguous row blocks path/part-00000.h5, ... (as data synth names them)."""
    if not 1 <= shards <= max(len(x), 1):
        raise MpitrainError(f"{path}: cannot split {len(x)} rows into {shards} shards")
    if shards == 1:
        write_rows(path, x, y, chunk_rows, compression)
        return
    for index in range(shards):
        start, stop = uniform(len(x), index, shards)
        write_rows(os.path.join(path, synth.shard_name(index)), x[start:stop], y[start:stop], chunk_rows, compression)


# ---------------------------------------------------------------------------- import


def _csv(path: str, label_column: int):
    with open(path) as handle:
        first = handle.readline()
    try:
        [float(v) for v in first.strip().split(",")]
        header = 0
    except ValueError:
        header = 1
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=header, ndmin=2)
    except ValueError as exc:
        raise MpitrainError(f"{path}: not a numeric CSV ({str(exc).splitlines()[0]})") from None
    if not -table.shape[1] <= label_column < table.shape[1] or table.shape[1] < 2:
        raise MpitrainError(f"{path}: --label-column {label_column} is not one of its {table.shape[1]} columns")
    y = table[:, label_column]
    x = np.delete(table, label_column % table.shape[1], axis=1)
    return x, (y.astype(np.int64) if np.all(y == np.round(y)) else y)


def _npz(path: str, x_key, y_key):
    archive = np.load(path, allow_pickle=False)
    pairs = [(x_key, y_key)] if x_key and y_key else KEY_PAIRS
    for a, b in pairs:
        if a in archive.files and b in archive.files:
            return archive[a], archive[b]
    raise MpitrainError(f"{path}: no inputs/labels pair among its arrays {archive.files}; name them with "
                        f"--x-key and --y-key")


def import_file(source: str, out: str, labels=None, x_key=None, y_key=None, label_column=-1, shards=1,
                compression="none", chunk_rows=None, force=False) -> int:
    """Write `source` (.npy with a labels .npy, .npz, or .csv) as HDF5 data at `out`; the row count."""
    refuse_overwrite(out, force)
    if chunk_rows is not None and chunk_rows < 1:
        raise MpitrainError(f"--chunk-rows {chunk_rows}: must be at least 1")
    if not os.path.isfile(source):
        raise MpitrainError(f"{source}: no such file")
    kind = os.path.splitext(source)[1].lower()
    try:
        if kind == ".npy":
            if labels is None:
                raise MpitrainError(f"{source}: a .npy holds one array; give the labels with --labels FILE.npy")
            x, y = np.load(source, mmap_mode="r"), np.load(labels, mmap_mode="r")
        elif kind == ".npz":
            x, y = _npz(source, x_key, y_key)
        elif kind == ".csv":
            x, y = _csv(source, label_column)
        else:
            raise MpitrainError(f"{source}: expected a .npy, .npz or .csv file")
    except (OSError, ValueError) as exc:
        raise MpitrainError(f"{source}: cannot read ({str(exc).splitlines()[0]})") from None
    if x.ndim < 2 or len(x) != len(y):
        raise MpitrainError(f"{source}: inputs of shape {x.shape} and labels of shape {y.shape} do not pair up "
                            f"(need (rows, features...) and (rows, ...))")
    write_shards(out, x, y, shards, chunk_rows, compression)
    return len(x)


# ---------------------------------------------------------------------------- split


def test_rows(labels: np.ndarray | None, n_rows: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted rows of the test part: a seeded round(n * fraction) rows, or per class round(n_c * fraction)."""
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.permutation(n_rows)[:int(round(n_rows * fraction))])
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        picked.append(rng.permutation(members)[:int(round(len(members) * fraction))])
    return np.sort(np.concatenate(picked))


class _Rows:
    """x or y of `dataset` at `rows`, indexable by row blocks as write_rows reads it."""

    def __init__(self, dataset, rows, name):
        self.dataset, self.rows, self.name = dataset, rows, name
        stored = dataset.x_row_shape if name == "x" else dataset.y_row_shape
        self.shape = (len(rows),) + stored
        self.dtype = dataset.x_dtype if name == "x" else dataset.y_dtype

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, block: slice):
        return self.dataset.read_stored(self.rows[block], self.name)


def split_file(source, train_out, test_out, fraction, seed, stratify=False, x_key="x", y_key="y",
               force=False) -> tuple[int, int]:
    """Write the rows of `source` to train_out and test_out (each in source order); (n_train, n_test)."""
    refuse_overwrite(train_out, force, "--train")
    refuse_overwrite(test_out, force, "--test")
    if not 0.0 < fraction < 1.0:
        raise MpitrainError(f"--test-fraction {fraction}: must be in (0, 1)")
    with H5Dataset(source, x_key, y_key) as dataset:
        labels = None
        if stratify:
            y = dataset.read_labels()
            classes = dataset.y_row_shape[0] if dataset.y_row_shape not in ((), (1,)) else int(np.max(y)) + 1
            try:
                labels = to_model(y, label_format(dataset.y_row_shape, dataset.y_dtype, "ce", classes))
            except MpitrainError as exc:
                raise MpitrainError(f"{source}: --stratify needs class labels: {exc}") from None
        test = test_rows(labels, dataset.n_rows, fraction, seed)
        train = np.setdiff1d(np.arange(dataset.n_rows), test)
        if len(test) == 0 or len(train) == 0:
            raise MpitrainError(f"--test-fraction {fraction} of {dataset.n_rows} rows leaves one part empty")
        for rows, out in ((train, train_out), (test, test_out)):
            write_rows(out, _Rows(dataset, rows, "x"), _Rows(dataset, rows, "y"))
    return len(train), len(test)
