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
