"""Start-up checks of everything a training run will write, before step 1: a missing folder, a
file where a folder should be, a read-only mount, or another run's checkpoint folder costs no
training. (Above outputs.py and checkpoint.py, which it uses.)"""

import os

from mpitrain.checkpoint import list_checkpoints
from mpitrain.comm import agree
from mpitrain.errors import MpitrainError, error_of
from mpitrain.outputs import check_file, probe_folder, reason
from mpitrain.trace import trace_path


def check_checkpoint_folder(folder: str, resume: str | None) -> None:
    """The folder exists (made now if missing) and is writable; without --resume it must not hold
    another run's checkpoints, which this run's pruning and a later --resume auto would mix up."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        if isinstance(exc, FileExistsError) or os.path.isfile(folder):
            raise MpitrainError(f"cannot write checkpoints to {folder}: it is a file, not a folder") from None
        raise MpitrainError(f"cannot write checkpoints to {folder}: {reason(exc)}") from None
    probe_folder(folder, os.path.join(folder, "ckpt-*.h5"))
    found = list_checkpoints(folder)
    if found and not resume:
        raise MpitrainError(
            f"--checkpoint-dir {folder} holds {len(found)} checkpoint(s) of another run (newest "
            f"{os.path.basename(found[-1][1])}): add --resume auto to continue that run, or use an empty folder")


def check_outputs(config, comm) -> None:
    """Every path this run will write (--save, --metrics, --trace, --checkpoint-dir) is writable now, before
    step 1, and the checkpoint folder is this run's. Rank 0 writes them all, so it checks and every
    rank raises alike. Collective on comm."""
    def check():
        for flag, path in (("--save", config.save), ("--metrics", config.metrics), ("--trace", trace_path(config))):
            if path:
                try:
                    check_file(path)
                except MpitrainError as exc:
                    raise MpitrainError(f"{flag}: {exc}") from None
        if config.checkpoint_dir:
            check_checkpoint_folder(config.checkpoint_dir, config.resume)

    agree(comm, error_of(check) if comm.rank == 0 else None)
