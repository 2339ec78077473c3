"""What mpitrain checks about the Slurm job it runs in.

The classic silent failure: `srun` without a PMI plugin the MPI library understands starts every
task as an MPI singleton, so N processes each train alone on all the data, as world size 1, and
the job looks healthy. Slurm's task count gives it away.
"""

import os

from mpitrain.errors import MpitrainError


def slurm_tasks(environ=os.environ) -> int | None:
    """Tasks Slurm started for this job step (SLURM_STEP_NUM_TASKS, else SLURM_NTASKS), None outside Slurm."""
    value = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS")
    try:
        return int(value) if value else None
    except ValueError:
        return None


def check_not_singleton(world_size: int, environ=os.environ) -> None:
    """Stop when Slurm started several tasks but MPI sees a world of one."""
    tasks = slurm_tasks(environ)
    if world_size == 1 and tasks is not None and tasks > 1:
        raise MpitrainError(
            f"Slurm started {tasks} tasks but MPI sees a world of 1: every task would train alone. "
            "Launch with `srun --mpi=pmi2` (MPICH; `--mpi=pmix` for Open MPI) or with mpirun inside the "
            "allocation; to run one process in this allocation use `srun -n 1`"
        )


# ---------------------------------------------------------------------------- stale MPICH segments


def fnv1a_32(text: str) -> int:
    """32-bit FNV-1a, the hash MPICH applies to its PMI job id to name shared memory."""
    value = 0x811C9DC5
    for byte in text.encode():
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return value


def stale_mpich_segments(job_step: str, shm_dir: str = "/dev/shm") -> list[str]:
    """Shared-memory files MPICH (ch4) would open for the Slurm step `job_step` ("1234.1").

    MPICH names them mpich_shm_<fnv1a(job.step)>_<node> and mpich_vci_..., and unlinks them in
    MPI_Finalize. Ranks killed hard leave them behind; a requeued job numbers its steps from 0
    again, so its step of the same name on the same node would attach to the dead job's segment
    and fail or hang in MPI_Init.
    """
    stem = f"{fnv1a_32(job_step):x}_"
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return []
    return sorted(os.path.join(shm_dir, name) for name in names
                  if name.startswith(("mpich_shm_", "mpich_vci_")) and name.split("_", 2)[2].startswith(stem))


def clean_next_step(environ=os.environ) -> list[str]:
    """Remove the stale segments of the step after this one (run as a one-task-per-node step just
    before the training step); returns the removed paths."""
    job, step = environ.get("SLURM_JOB_ID"), environ.get("SLURM_STEP_ID")
    if not job or not step or not step.isdecimal():
        raise MpitrainError("run this inside a Slurm job step: srun --ntasks-per-node=1 python -m mpitrain.slurm")
    removed = []
    for path in stale_mpich_segments(f"{job}.{int(step) + 1}"):
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


if __name__ == "__main__":
    for path in clean_next_step():
        print(f"mpitrain: removed {path}, left by an earlier run of this job step")
