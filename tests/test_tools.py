"""data inspect / import / split round trips, overwrite refusals, and what training says about its data."""

import os

import h5py
import numpy as np
import pytest

from harness import mpitrain_argv, run_on_root
from mpitrain.cli import run
from mpitrain.data import tools
from mpitrain.data.hdf5 import H5Dataset
from mpitrain.data.synth import make_classification, write_h5
from mpitrain.errors import MpitrainError

ROWS, FEATURES, CLASSES = 97, 5, 3


@pytest.fixture
def arrays():
    return make_classification(ROWS, FEATURES, CLASSES, seed=1, dtype=np.float64)


def read_all(path):
    with H5Dataset(path) as ds:
        return ds.read(np.arange(ds.n_rows))


@pytest.mark.parametrize("source", ["npy", "npz", "csv", "csv_header_first_column"])
@pytest.mark.parametrize("shards,compression", [(1, "none"), (3, "gzip"), (2, "lzf")])
def test_import_round_trips(tmp_path, arrays, source, shards, compression):
    x, y = arrays
    if source == "npy":
        np.save(tmp_path / "x.npy", x)
        np.save(tmp_path / "y.npy", y)
        path, extra = str(tmp_path / "x.npy"), dict(labels=str(tmp_path / "y.npy"))
    elif source == "npz":
        np.savez(tmp_path / "d.npz", data=x, target=y)
        path, extra = str(tmp_path / "d.npz"), {}
    elif source == "csv":
        np.savetxt(tmp_path / "d.csv", np.column_stack([x, y]), delimiter=",", fmt="%.17g")
        path, extra = str(tmp_path / "d.csv"), {}
    else:
        np.savetxt(tmp_path / "h.csv", np.column_stack([y, x]), delimiter=",", fmt="%.17g",
                   header="label," + ",".join(f"f{i}" for i in range(FEATURES)), comments="")
        path, extra = str(tmp_path / "h.csv"), dict(label_column=0)
    out = str(tmp_path / ("out.h5" if shards == 1 else "out"))
    assert tools.import_file(path, out, shards=shards, compression=compression, **extra) == ROWS
    got_x, got_y = read_all(out)
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)
    assert got_y.dtype.kind == "i"
    first = out if shards == 1 else os.path.join(out, "part-00000.h5")
    with h5py.File(first, "r") as f:
        assert f["x"].compression == (None if compression == "none" else compression)
        if compression != "none":
            assert f["x"].chunks[0] * FEATURES * 8 <= tools.TARGET_CHUNK_BYTES
    with pytest.raises(MpitrainError, match="already exists; pass --force"):
        tools.import_file(path, out, shards=shards, **extra)
    tools.import_file(path, out, shards=shards, force=True, **extra)


@pytest.mark.parametrize("stratify", [False, True])
def test_split_is_seeded_disjoint_and_complete(tmp_path, arrays, stratify):
    x, y = arrays
    source = str(tmp_path / "all.h5")
    images = x.reshape(ROWS, FEATURES, 1)  # N-D inputs keep their row shape through the split
    with h5py.File(source, "w") as f:
        f["x"], f["y"] = images, y[:, None]
    a, b = str(tmp_path / "train.h5"), str(tmp_path / "test.h5")
    n_train, n_test = tools.split_file(source, a, b, 0.25, seed=4, stratify=stratify)
    expected_test = tools.test_rows(y if stratify else None, ROWS, 0.25, 4)
    train_rows = np.setdiff1d(np.arange(ROWS), expected_test)
    assert (n_train, n_test) == (len(train_rows), len(expected_test))
    with h5py.File(a, "r") as f_train, h5py.File(b, "r") as f_test:
        np.testing.assert_array_equal(f_train["x"][()], images[train_rows])
        np.testing.assert_array_equal(f_test["x"][()], images[expected_test])
        np.testing.assert_array_equal(f_test["y"][()], y[expected_test, None])
    if stratify:
        counts = np.bincount(y[expected_test], minlength=CLASSES)
        np.testing.assert_array_equal(counts, np.round(np.bincount(y) * 0.25).astype(int))
    with pytest.raises(MpitrainError, match="--train .*already exists"):
        tools.split_file(source, a, b, 0.25, seed=4)


def test_inspect_finds_the_keys_and_describes_labels(tmp_path, arrays):
    x, y = arrays
    path = str(tmp_path / "sk.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("train/images", data=x.reshape(ROWS, 5, 1), chunks=(10, 5, 1), compression="gzip")
        f["train/labels"] = np.eye(CLASSES)[y]
    text = "\n".join(tools.inspect(path))
    for fragment in ["train/images: shape (97, 5, 1), float64, chunks (10, 5, 1), gzip", f"{ROWS} rows",
                     "one-hot in [0, 3)", f"class counts {np.bincount(y).tolist()}",
                     f"works as mpitrain data: --data {path} --x-key train/images --y-key train/labels"]:
        assert fragment in text, f"{fragment!r} not in {text!r}"


def test_inspect_says_when_a_file_does_not_work(tmp_path):
    path = str(tmp_path / "short.h5")
    with h5py.File(path, "w") as f:
        f["x"], f["y"] = np.zeros((4, 2)), np.zeros(3)
    assert "does not work as mpitrain data" in tools.inspect(path)[-1]


# ---------------------------------------------------------------- through the command line

def test_synth_refuses_to_overwrite(comm, shared_dir):
    out = os.path.join(shared_dir, "synth.h5")
    argv = ["data", "synth", "--samples", "20", "--features", "3", "--out", out]
    run(argv)
    with pytest.raises(MpitrainError, match="already exists; pass --force"):
        run(argv)
    run(argv + ["--force"])


def test_training_names_its_files_rows_and_split(comm, shared_dir, arrays):
    """--data DIR: the start-up line says how many files and rows, and the training/validation split."""
    x, y = arrays
    folder = os.path.join(shared_dir, "shards")
    if comm.rank == 0:
        write_h5(folder, x, y, shards=3)
    comm.Barrier()
    done = run_on_root(comm, mpitrain_argv(2, "train", "--data", folder, "--model", f"{FEATURES}-4-{CLASSES}",
                                           "--steps", "2", "--batch-size", "8", "--no-progress", "--device", "cpu"))
    assert done["returncode"] == 0, done["stderr"]
    n_val = int(round(ROWS * 0.1))
    assert f"3 files, {ROWS} rows" in done["stdout"]
    assert f"{ROWS - n_val} training rows, {n_val} validation rows" in done["stdout"]


def test_keys_flags_and_labels_through_the_cli(comm, shared_dir, arrays):
    x, y = arrays
    path = os.path.join(shared_dir, "keys.h5")
    if comm.rank == 0:
        with h5py.File(path, "w") as f:
            f["train/images"], f["train/labels"] = x, y[:, None]
    comm.Barrier()
    base = ["train", "--data", path, "--model", f"{FEATURES}-4-{CLASSES}", "--steps", "2", "--batch-size", "8",
            "--no-progress", "--device", "cpu"]
    with pytest.raises(MpitrainError, match="missing dataset 'x'.*try --x-key train/images --y-key train/labels"):
        run(base)
    run(base + ["--x-key", "train/images", "--y-key", "train/labels", "--partition", "stratified"])
