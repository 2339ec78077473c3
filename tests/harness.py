"""Helpers for tests that start their own jobs (`mpirun`, `mpitrain`) as subprocesses."""

import os
import subprocess
import sys
import time

_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "HYDI_", "HYDRA_", "MPIR_", "MPI_LOCAL", "OMPI_", "I_MPI_", "SLURM_")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the outer launcher's variables, so a nested mpirun starts afresh
    (inside a Slurm job too: with SLURM_* set, mpirun would launch through srun, not fork locally)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    env.update(extra)
    return env


def run_on_root(comm, argv: list[str], timeout: float = 120, **env: str) -> dict:
    """Run `argv` as a subprocess on rank 0 only, and give every rank its result.

    Nested jobs are started once rather than once per rank: four ranks each starting an
    `mpirun -n 2` would oversubscribe a small machine for no extra coverage.
    """
    result = None
    if comm.rank == 0:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=clean_env(**env))
            result = {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}
        except subprocess.TimeoutExpired as exc:
            result = {"returncode": None, "stdout": str(exc.stdout), "stderr": f"timed out after {timeout} s"}
    # The other ranks sleep rather than spin in MPI while they wait: on a small machine their
    # polling would take the cores the nested job needs.
    arrived = comm.Ibarrier()
    while not arrived.Test():
        time.sleep(0.01)
    return comm.bcast(result, root=0)


def mpitrain_argv(world_size: int, *args: str) -> list[str]:
    """`mpirun -n W python -m mpitrain ARGS` with this interpreter (or no mpirun for W = 0)."""
    command = [sys.executable, "-m", "mpitrain", *args]
    if world_size == 0:
        return command
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return [mpirun if os.path.exists(mpirun) else "mpirun", "-n", str(world_size), *command]


def write_on_root(comm, path: str, x, y, shards: int = 1) -> str:
    """Rank 0 writes (x, y) to `path` as an HDF5 set; every rank returns once it exists."""
    if comm.rank == 0:
        from mpitrain.data import synth

        synth.write_h5(path, x, y, shards=shards)
    comm.Barrier()
    return path
