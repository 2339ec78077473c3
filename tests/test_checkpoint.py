"""Checkpoint files: exact round trip, damage and truncation detected, nothing but numbers and JSON
read, newest-valid selection and pruning. Pure file tests: every rank uses its own tmp_path."""

import json
import os
import pickle

import h5py
import numpy as np
import pytest

from mpitrain.checkpoint import (
    Checkpoint,
    CorruptCheckpoint,
    checkpoint_name,
    expected_datasets,
    holds_residual,
    list_checkpoints,
    load_checkpoint,
    newest_valid_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)


def sample(step: int) -> Checkpoint:
    rng = np.random.default_rng(step)
    arrays = {
        "model/0/weight": rng.standard_normal((5, 3)).astype(np.float32),
        "model/0/bias": rng.standard_normal(3).astype(np.float32),
        "optimizer/m": rng.standard_normal(18),
        "rng/numpy_key": rng.integers(0, 2**32, size=(2, 624), dtype=np.uint32),
    }
    return Checkpoint({"step": step, "epoch": 1, "config": {"lr": 0.001, "model": "5-3"}}, arrays)


def write(folder, step: int) -> str:
    path = os.path.join(folder, checkpoint_name(step))
    save_checkpoint(path, sample(step))
    return path


def test_round_trip_is_exact(tmp_path):
    path = write(tmp_path, 12)
    loaded, original = load_checkpoint(path), sample(12)
    assert loaded.meta == original.meta
    assert loaded.arrays.keys() == original.arrays.keys()
    for name, array in original.arrays.items():
        assert loaded.arrays[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded.arrays[name], array, err_msg=name)
    assert os.listdir(tmp_path) == [checkpoint_name(12)], "temporary file left behind"


def test_flipped_byte_fails_the_checksum(tmp_path):
    path = write(tmp_path, 3)
    with h5py.File(path, "r") as handle:
        offset = handle["optimizer/m"].id.get_offset()
    with open(path, "r+b") as raw:
        raw.seek(offset + 17)
        byte = raw.read(1)
        raw.seek(offset + 17)
        raw.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(CorruptCheckpoint, match="checksum mismatch"):
        load_checkpoint(path)


def test_edited_metadata_fails_the_checksum(tmp_path):
    path = write(tmp_path, 3)
    with h5py.File(path, "r+") as handle:
        meta = json.loads(handle.attrs["meta"])
        meta["step"] = 4
        handle.attrs["meta"] = json.dumps(meta, sort_keys=True)
    with pytest.raises(CorruptCheckpoint, match="checksum mismatch"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep_fraction", [0.0, 0.3, 0.9])
def test_truncated_file_is_reported(tmp_path, keep_fraction):
    path = write(tmp_path, 3)
    with open(path, "r+b") as raw:
        raw.truncate(int(os.path.getsize(path) * keep_fraction))
    with pytest.raises(CorruptCheckpoint, match="ckpt-00000003.h5"):
        load_checkpoint(path)


def test_pickled_payload_is_refused_unread(tmp_path):
    """A dataset of opaque bytes (here a pickle) is refused by dtype, never deserialized."""
    path = write(tmp_path, 3)
    with h5py.File(path, "r+") as handle:
        handle["evil"] = np.void(pickle.dumps(object()))
    with pytest.raises(CorruptCheckpoint, match="'evil' has non-numeric dtype"):
        load_checkpoint(path)


def test_a_plain_hdf5_file_is_not_a_checkpoint(tmp_path):
    path = os.path.join(tmp_path, checkpoint_name(1))
    with h5py.File(path, "w") as handle:
        handle["x"] = np.zeros(3)
    with pytest.raises(CorruptCheckpoint, match="not an mpitrain checkpoint"):
        load_checkpoint(path)


def test_newest_valid_skips_a_damaged_newest(tmp_path):
    for step in (5, 10, 15):
        write(tmp_path, step)
    newest = os.path.join(tmp_path, checkpoint_name(15))
    with open(newest, "r+b") as raw:
        raw.truncate(os.path.getsize(newest) // 2)
    warnings = []
    path, meta, datasets = newest_valid_checkpoint(str(tmp_path), warnings.append)
    assert path == os.path.join(tmp_path, checkpoint_name(10)) and meta["step"] == 10 and datasets
    assert len(warnings) == 1 and "ckpt-00000015.h5" in warnings[0] and "previous" in warnings[0]


def test_empty_or_missing_folder_has_no_checkpoint(tmp_path):
    assert newest_valid_checkpoint(str(tmp_path), print) is None
    assert newest_valid_checkpoint(os.path.join(tmp_path, "absent"), print) is None


def test_prune_keeps_the_newest_and_removes_temporaries(tmp_path):
    for step in (2, 4, 6, 8, 100):
        write(tmp_path, step)
    stale = os.path.join(tmp_path, f".{checkpoint_name(10)}.tmp12345")
    open(stale, "w").close()
    unrelated = os.path.join(tmp_path, "notes.txt")
    open(unrelated, "w").close()
    prune_checkpoints(str(tmp_path), keep=2)
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [8, 100]
    assert not os.path.exists(stale) and os.path.exists(unrelated)


def test_the_residual_datasets_are_expected_only_where_the_metadata_says_so():
    """A checkpoint of --error-feedback holds residual/<name> per parameter and says so ('residual':
    true); one written before residuals were saved has no such field and none is expected of it."""
    shapes = {"0/weight": (5, 3), "0/bias": (3,)}
    older = expected_datasets(shapes, ["m", "v"], 2, holds_residual({"step": 4}, "old.h5"))
    now = expected_datasets(shapes, ["m", "v"], 2, holds_residual({"step": 4, "residual": True}, "new.h5"))
    assert set(now) - set(older) == {"residual/0/weight", "residual/0/bias"}
    assert now["residual/0/weight"] == ((5, 3), "f")
    with pytest.raises(CorruptCheckpoint, match="bad.h5: checkpoint field 'residual' = \"yes\""):
        holds_residual({"residual": "yes"}, "bad.h5")
