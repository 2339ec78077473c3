"""H5Dataset over one file, a shard directory and a glob: reads equal the in-memory arrays, each read
touches only the requested rows, and every bad input is one MpitrainError naming file and dataset."""

import os

import h5py
import numpy as np
import pytest

from mpitrain.data.hdf5 import H5Dataset
from mpitrain.data.partition import uniform_rows
from mpitrain.data.sampler import GlobalSampler
from mpitrain.data.synth import make_classification, write_h5
from mpitrain.errors import MpitrainError

N_ROWS, N_FEATURES, N_CLASSES, N_SHARDS = 103, 7, 3, 4


@pytest.fixture
def data():
    return make_classification(N_ROWS, N_FEATURES, N_CLASSES, seed=0)


@pytest.fixture
def single(tmp_path, data):
    path = str(tmp_path / "single.h5")
    write_h5(path, *data)
    return path


@pytest.fixture
def sharded(tmp_path, data):
    path = str(tmp_path / "shards")
    write_h5(path, *data, shards=N_SHARDS)
    return path


def test_layout_is_reported(single, data):
    with H5Dataset(single) as ds:
        assert (ds.n_rows, ds.n_features) == data[0].shape
        assert ds.x_dtype == data[0].dtype and ds.y_dtype == data[1].dtype
        assert ds.is_classification and ds.y_width == 1


@pytest.mark.parametrize("source", ["single", "sharded", "glob"])
def test_reads_equal_the_arrays(source, single, sharded, data):
    path = {"single": single, "sharded": sharded, "glob": os.path.join(sharded, "part-*.h5")}[source]
    x, y = data
    rng = np.random.default_rng(1)
    with H5Dataset(path) as ds:
        assert len(ds.paths) == (1 if source == "single" else N_SHARDS)
        for size in [1, 5, 40, N_ROWS]:
            rows = np.sort(rng.choice(N_ROWS, size=size, replace=False))
            got_x, got_y = ds.read(rows)
            np.testing.assert_array_equal(got_x, x[rows])
            np.testing.assert_array_equal(got_y, y[rows])
        np.testing.assert_array_equal(ds.read_labels(), y)


def test_shard_directory_equals_single_file(single, sharded):
    rows = np.arange(N_ROWS)
    with H5Dataset(single) as one, H5Dataset(sharded) as many:
        assert (one.n_rows, one.n_features) == (many.n_rows, many.n_features)
        for a, b in zip(one.read(rows), many.read(rows)):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(one.read_labels(chunk_rows=10), many.read_labels(chunk_rows=10))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_each_rank_reads_only_its_own_rows(sharded, world):
    train_rows = np.arange(N_ROWS)
    for rank in range(world):
        own = uniform_rows(train_rows, rank, world)
        scattered = next(GlobalSampler(train_rows, 2 * world + 1, rank, world, seed=0).batches(0))
        for rows in [own, scattered]:
            with H5Dataset(sharded) as ds:
                ds.trace = True
                ds.read(rows)
                np.testing.assert_array_equal(ds.rows_read(), rows)


def test_contiguous_rows_are_one_slice_per_shard(sharded):
    with H5Dataset(sharded) as ds:
        ds.trace = True
        ds.read(np.arange(N_ROWS))
        assert [file_index for file_index, _, _ in ds.selections] == list(range(N_SHARDS))
        assert all(isinstance(key, slice) for _, key, _ in ds.selections)


def test_many_short_runs_are_one_fancy_read_per_shard(sharded):
    rows = np.arange(0, N_ROWS, 2)
    with H5Dataset(sharded) as ds:
        ds.trace = True
        ds.read(rows)
        assert [file_index for file_index, _, _ in ds.selections] == list(range(N_SHARDS))
        assert not any(isinstance(key, slice) for _, key, _ in ds.selections)
        np.testing.assert_array_equal(ds.rows_read(), rows)


def test_unsorted_and_repeated_rows_come_back_in_the_given_order(single, data):
    rows = np.array([9, 2, 9, 50, 0])
    with H5Dataset(single) as ds:
        ds.trace = True
        got_x, got_y = ds.read(rows)
        np.testing.assert_array_equal(ds.rows_read(), np.unique(rows))
    np.testing.assert_array_equal(got_x, data[0][rows])
    np.testing.assert_array_equal(got_y, data[1][rows])


def test_empty_read_keeps_row_shapes(single):
    with H5Dataset(single) as ds:
        x, y = ds.read(np.array([], dtype=np.int64))
    assert x.shape == (0, N_FEATURES) and y.shape == (0,)


def test_rows_out_of_range_are_rejected(single):
    with H5Dataset(single) as ds, pytest.raises(IndexError):
        ds.read(np.array([N_ROWS]))


def test_multi_output_regression_targets(tmp_path):
    x = np.random.default_rng(0).random((20, 3))
    y = x[:, :2] * 2.0
    path = str(tmp_path / "reg.h5")
    write_h5(path, x, y)
    with H5Dataset(path) as ds:
        assert not ds.is_classification and ds.y_width == 2
        np.testing.assert_array_equal(ds.read(np.arange(3, 8))[1], y[3:8])


# ---------------------------------------------------------------- bad input: one line, names file + dataset

def write_raw(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f.create_dataset(name, data=value)
    return str(path)


def case_missing_file(tmp_path):
    return str(tmp_path / "absent.h5"), ["absent.h5", "no such file"]


def case_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    return str(tmp_path / "empty"), ["empty", "no *.h5"]


def case_glob_without_matches(tmp_path):
    return str(tmp_path / "nothing-*.h5"), ["nothing-*.h5", "matches no files"]


def case_random_bytes(tmp_path):
    path = tmp_path / "noise.h5"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return str(path), ["noise.h5", "not a readable HDF5 file"]


def case_truncated(tmp_path):
    good = write_raw(tmp_path / "good.h5", x=np.zeros((100, 4)), y=np.zeros(100))
    whole = open(good, "rb").read()
    path = tmp_path / "truncated.h5"
    path.write_bytes(whole[:len(whole) // 2])
    return str(path), ["truncated.h5", "not a readable HDF5 file"]


def case_missing_x(tmp_path):
    return write_raw(tmp_path / "nox.h5", y=np.zeros(3)), ["nox.h5", "missing dataset 'x'"]


def case_missing_y(tmp_path):
    return write_raw(tmp_path / "noy.h5", x=np.zeros((3, 2))), ["noy.h5", "missing dataset 'y'"]


def case_length_mismatch(tmp_path):
    path = write_raw(tmp_path / "short.h5", x=np.zeros((10, 2)), y=np.zeros(9))
    return path, ["short.h5", "dataset 'x' has 10 rows but 'y' has 9"]


def case_non_numeric_x(tmp_path):
    path = write_raw(tmp_path / "text.h5", x=np.array([[b"a", b"b"]] * 3), y=np.zeros(3))
    return path, ["text.h5", "dataset 'x' has non-numeric dtype"]


def case_non_numeric_y(tmp_path):
    path = write_raw(tmp_path / "texty.h5", x=np.zeros((3, 2)), y=np.array([b"cat"] * 3))
    return path, ["texty.h5", "dataset 'y' has non-numeric dtype"]


def case_x_not_2d(tmp_path):
    path = write_raw(tmp_path / "flat.h5", x=np.zeros(6), y=np.zeros(6))
    return path, ["flat.h5", "dataset 'x' must be 2-D"]


def case_shards_differ_in_features(tmp_path):
    directory = tmp_path / "mixed"
    directory.mkdir()
    write_raw(directory / "a.h5", x=np.zeros((4, 7)), y=np.zeros(4))
    write_raw(directory / "b.h5", x=np.zeros((4, 8)), y=np.zeros(4))
    return str(directory), ["b.h5", "dataset 'x' row shape (8,) differs from (7,)", "a.h5"]


def case_corrupt_shard(tmp_path):
    directory = tmp_path / "onebad"
    directory.mkdir()
    write_raw(directory / "a.h5", x=np.zeros((4, 7)), y=np.zeros(4))
    (directory / "b.h5").write_bytes(b"\0" * 1024)
    return str(directory), ["b.h5", "not a readable HDF5 file"]


BAD_INPUTS = [case_missing_file, case_empty_directory, case_glob_without_matches, case_random_bytes,
              case_truncated, case_missing_x, case_missing_y, case_length_mismatch, case_non_numeric_x,
              case_non_numeric_y, case_x_not_2d, case_shards_differ_in_features, case_corrupt_shard]


@pytest.mark.parametrize("make_case", BAD_INPUTS, ids=lambda f: f.__name__[len("case_"):])
def test_bad_input_is_one_line_naming_file_and_dataset(tmp_path, make_case):
    path, expected = make_case(tmp_path)
    with pytest.raises(MpitrainError) as raised:
        H5Dataset(path)
    message = str(raised.value)
    assert "\n" not in message
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# ---------------------------------------------------------------- keys, groups, N-D inputs, chunk caches

def test_keys_may_name_datasets_inside_groups(tmp_path, data):
    x, y = data
    path = str(tmp_path / "grouped.h5")
    with h5py.File(path, "w") as f:
        f["train/images"] = x
        f["train/labels"] = y
    rows = np.array([0, 5, 6, 7, 90])
    with H5Dataset(path, x_key="train/images", y_key="train/labels") as ds:
        got_x, got_y = ds.read(rows)
    np.testing.assert_array_equal(got_x, x[rows])
    np.testing.assert_array_equal(got_y, y[rows])


def test_a_missing_key_lists_the_datasets_and_suggests_keys(tmp_path, data):
    x, y = data
    path = write_raw(tmp_path / "sk.h5", data=x, target=y)
    with pytest.raises(MpitrainError) as raised:
        H5Dataset(path)
    message = str(raised.value)
    assert "\n" not in message
    for fragment in ["missing dataset 'x'", f"data {x.shape} {x.dtype}", f"target {y.shape} {y.dtype}",
                     "--x-key data --y-key target"]:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize("row_shape", [(8, 8), (4, 4, 1), (2, 3, 2)])
def test_nd_inputs_read_flattened(tmp_path, row_shape):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(30,) + row_shape, dtype=np.uint8)
    path = write_raw(tmp_path / "images.h5", x=images, y=np.arange(30) % 3)
    rows = np.array([1, 2, 3, 17, 29])
    with H5Dataset(path) as ds:
        assert ds.n_features == int(np.prod(row_shape)) and ds.x_row_shape == row_shape
        ds.x_out_dtype = np.dtype(np.float32)
        got_x, _ = ds.read(rows)
        whole = ds.read_x(np.arange(30))
    assert got_x.dtype == np.float32
    np.testing.assert_array_equal(got_x, images[rows].reshape(len(rows), -1).astype(np.float32))
    np.testing.assert_array_equal(whole, images.reshape(30, -1).astype(np.float32))


@pytest.mark.parametrize("budget_mb", ["512", "0.004"])
@pytest.mark.parametrize("compression", [None, "gzip", "lzf"])
def test_chunked_reads_equal_the_arrays_and_read_each_chunk_once(tmp_path, data, compression, budget_mb,
                                                                  monkeypatch):
    """Scattered rows read again and again come from whole chunks read once while the budget holds
    them (a 4 KiB budget holds one 10-row block, so blocks are read again, and reads stay right)."""
    monkeypatch.setenv("MPITRAIN_CHUNK_CACHE_MB", budget_mb)
    x, y = data
    path = str(tmp_path / "chunked.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, chunks=(10, N_FEATURES), compression=compression)
        f.create_dataset("y", data=y, chunks=(10,), compression=compression)
    train_rows = np.arange(N_ROWS)
    batches = [rows for epoch in range(3) for rows in GlobalSampler(train_rows, 8, 0, 1, seed=epoch).batches(0)]
    for rereads in (False, True):
        with H5Dataset(path, rereads=rereads) as ds:
            ds.trace = True
            for rows in batches:
                got_x, got_y = ds.read(rows)
                np.testing.assert_array_equal(got_x, x[rows])
                np.testing.assert_array_equal(got_y, y[rows])
            np.testing.assert_array_equal(ds.read(train_rows)[0], x)
            chunk_reads = sum(1 for _, key, names in ds.selections if "x" in names)
            if rereads and budget_mb == "512":
                assert chunk_reads == -(-N_ROWS // 10)  # every 10-row chunk once, for all 3 epochs
            assert ds.cache_wanted == (11 * 10 * (N_FEATURES * x.itemsize + y.itemsize)
                                       if rereads else 0)


def test_global_sampler_over_large_chunks_warns_once_with_advice(comm, shared_dir):
    from harness import mpitrain_argv, run_on_root

    x, y = make_classification(400, N_FEATURES, N_CLASSES, seed=0)
    path = os.path.join(shared_dir, "big-chunks.h5")
    if comm.rank == 0:
        with h5py.File(path, "w") as f:
            f.create_dataset("x", data=x, chunks=(200, N_FEATURES), compression="gzip")
            f["y"] = y
    comm.Barrier()
    argv = mpitrain_argv(2, "train", "--data", path, "--model", f"{N_FEATURES}-4-{N_CLASSES}", "--steps", "2",
                         "--batch-size", "16", "--sampler", "global", "--no-progress", "--device", "cpu")
    done = run_on_root(comm, argv, MPITRAIN_CHUNK_CACHE_MB="0.01")
    assert done["returncode"] == 0, done["stderr"]
    assert done["stderr"].count("mpitrain: warning: --sampler global") == 1
    assert "use --sampler shard, raise MPITRAIN_CHUNK_CACHE_MB" in done["stderr"]
    quiet = run_on_root(comm, argv)
    assert "warning" not in quiet["stderr"]


@pytest.mark.parametrize("budget_mb", ["512", "0.001"])
def test_shared_blocks_are_decompressed_once_per_job(comm, shared_dir, data, budget_mb, monkeypatch):
    """--sampler global: when every chunk fits the budget, the job reads (decompresses) each chunk
    once in all (each rank its share), every rank then serves any row from memory, equal to the
    arrays; over budget (or alone) nothing is shared and rows are read as they are needed."""
    monkeypatch.setenv("MPITRAIN_CHUNK_CACHE_MB", budget_mb)
    x, y = data
    path = os.path.join(shared_dir, "gzip.h5")
    if comm.rank == 0:
        with h5py.File(path, "w") as f:
            f.create_dataset("x", data=x, chunks=(10, N_FEATURES), compression="gzip")
            f.create_dataset("y", data=y, chunks=(10,), compression="gzip")
    comm.Barrier()
    with H5Dataset(path, rereads=True) as ds:
        ds.trace = True
        ds.share_blocks(comm)
        shared = len(ds.selections)
        fits = budget_mb == "512" and comm.size > 1  # one rank reads each chunk once anyway
        assert comm.allreduce(shared) == (2 * -(-N_ROWS // 10) if fits else 0)  # x and y blocks, once each
        for epoch in range(2):
            for rows in GlobalSampler(np.arange(N_ROWS), 8, comm.rank, comm.size, seed=epoch).batches(0):
                got_x, got_y = ds.read(rows)
                np.testing.assert_array_equal(got_x, x[rows])
                np.testing.assert_array_equal(got_y, y[rows])
        if fits:
            assert len(ds.selections) == shared  # no read after the exchange
