"""Settings a command line leaves to files: a resumed run's stored config, and the model of --init-from.

    mpirun -n 2 mpitrain train --data s2000.h5 --model 784-256-10 --epochs 5 --checkpoint-dir ck
    mpirun -n 2 mpitrain train --checkpoint-dir ck --resume auto --epochs 8   # same data and model, 8 epochs
    mpitrain train --init-from model.h5 --data more.h5                      # --model from model.h5

`--resume` takes every setting the checkpoint's run had (its config is stored in the file), then
what this command line gives (flags, --config, --preset) on top; the resumed run warns naming each
setting that differs, old -> new (resilience.py). Rank 0 reads the file and broadcasts what it
found, so every rank builds the same config (compared again at start-up).
"""

from mpi4py import MPI

from mpitrain.checkpoint import CorruptCheckpoint, is_checkpoint, list_checkpoints, read_meta, verify_checkpoint
from mpitrain.comm import agree
from mpitrain.config import FIELD_TYPES, coerce
from mpitrain.errors import MpitrainError
from mpitrain.h5 import open_read

# Never taken from a checkpoint: how to resume is this command's business, the bar and the BLAS
# threads belong to this machine, and the checkpoint's own parameters replace any --init-from.
NOT_RESTORED = ("resume", "progress", "threads", "init_from")


def stored_settings(resume: str, checkpoint_dir: str | None) -> tuple[str, dict] | None:
    """(path, {field: value}) of the config stored in the checkpoint `resume` names (a path, or
    'auto': the newest in checkpoint_dir whose digest checks out, the one the resume will load);
    None when 'auto' finds none. Raises MpitrainError naming the file for a missing or unreadable
    one, or a bad stored value. Local.

    Under 'auto' a damaged newest file is skipped here as the resume skips it (the digest is read
    in full, once more than the resume reads it): taking its settings while resuming from the one
    before applied another run's --save path and steps to it."""
    if resume == "auto":
        if not checkpoint_dir:
            return None  # validation names what is missing, with the command line's message
        for _, path in reversed(list_checkpoints(checkpoint_dir)):
            try:
                return path, _checked(path, verify_checkpoint(path)[0])
            except CorruptCheckpoint:
                continue  # the resume itself warns about it and falls back the same way
        return None
    return resume, _checked(resume, read_meta(resume))


def _checked(path: str, meta: dict) -> dict:
    config = meta.get("config")
    if not isinstance(config, dict):
        raise MpitrainError(f"{path}: checkpoint field 'config' is missing or not an object")
    return {name: coerce(name, value, f"{path}: stored config") for name, value in config.items()
            if name in FIELD_TYPES and name not in NOT_RESTORED}


def saved_model(path: str) -> dict:
    """{'model': widths, 'activation': ...} of a --save file or a checkpoint, for --init-from without
    --model. Local; MpitrainError naming the file when it holds no model description."""
    with open_read(path, "--init-from ") as handle:
        if is_checkpoint(handle):
            model = read_meta(path).get("model")
            found = {key: model.get(key) for key in ("widths", "activation")} if isinstance(model, dict) else {}
            found = {"model": found.get("widths"), "activation": found.get("activation")}
        else:
            found = {key: handle.attrs.get(key) for key in ("model", "activation")}
    found = {key: value.decode() if isinstance(value, bytes) else value for key, value in found.items()}
    if not isinstance(found["model"], str):
        raise MpitrainError(f"--init-from {path}: the file does not say its model; give --model")
    return {key: value for key, value in found.items() if isinstance(value, str)}


def complete(given: dict, comm: MPI.Intracomm) -> dict:
    """`given` (the settings this command line sets) completed from files: a resumed checkpoint's
    stored settings underneath, and --init-from's model when no --model is set. Collective on comm."""
    found, error = None, None
    if comm.rank == 0:
        try:
            found = {}
            if given.get("resume"):
                stored = stored_settings(given["resume"], given.get("checkpoint_dir"))
                found = stored[1] if stored else {}
            init_from = given.get("init_from")
            if init_from and "model" not in given and "model" not in found:
                model = saved_model(init_from)
                found.update({key: value for key, value in model.items() if key not in given})
        except MpitrainError as exc:
            error = exc
    agree(comm, error)
    return {**comm.bcast(found, root=0), **given}
