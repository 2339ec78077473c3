"""Slurm launch checks and the job templates (the templates run under a real Slurm in CI: .ci/slurm-ci.sh)."""

import glob
import os
import subprocess

import pytest

from harness import mpitrain_argv, run_on_root
from mpitrain.errors import MpitrainError
from mpitrain.slurm import check_not_singleton, clean_next_step, fnv1a_32, slurm_tasks, stale_mpich_segments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = sorted(glob.glob(os.path.join(ROOT, "jobs", "*.sbatch")))


def test_singleton_tasks_are_detected():
    with pytest.raises(MpitrainError, match=r"Slurm started 4 tasks but MPI sees a world of 1.*srun --mpi=pmi2"):
        check_not_singleton(1, {"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"})


@pytest.mark.parametrize("world,environ", [
    (1, {}),                                                   # not under Slurm
    (1, {"SLURM_NTASKS": "1"}),
    (4, {"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"}),   # srun --mpi=pmi2 worked
    (1, {"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"}),   # srun -n 1 inside a bigger allocation
])
def test_proper_launches_pass(world, environ):
    check_not_singleton(world, environ)


def test_step_task_count_wins_over_the_job_count():
    assert slurm_tasks({"SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "2"}) == 2
    assert slurm_tasks({"SLURM_NTASKS": "8"}) == 8
    assert slurm_tasks({}) is None


def test_singleton_run_stops_with_one_line(comm):
    done = run_on_root(comm, mpitrain_argv(0, "train", "--steps", "1"), timeout=60,
                       SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="0")
    assert done["returncode"] == 2, done
    assert done["stderr"].startswith("mpitrain: error: Slurm started 2 tasks") and "--mpi=pmi2" in done["stderr"]


def test_templates_exist_and_parse():
    names = {os.path.basename(path) for path in TEMPLATES}
    assert {"train-srun.sbatch", "train-mpirun.sbatch", "test.sbatch", "train-2nodes-gpu.sbatch"} <= names
    for path in TEMPLATES + glob.glob(os.path.join(ROOT, ".ci", "slurm-*.sh")):
        subprocess.run(["bash", "-n", path], check=True)


@pytest.mark.parametrize("path", TEMPLATES, ids=os.path.basename)
def test_templates_say_how_to_submit(path):
    assert f"sbatch jobs/{os.path.basename(path)}" in open(path).read(), "header lacks the submit line"


@pytest.mark.parametrize("path", [p for p in TEMPLATES if "/train-" in p], ids=os.path.basename)
def test_training_templates_checkpoint_and_requeue(path):
    text = open(path).read()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@120" in text
    assert "#SBATCH --open-mode=append" in text and "--resume auto" in text and "scontrol requeue" in text


def test_fnv1a_matches_the_published_vectors():
    # Test vectors from the FNV reference (Fowler/Noll/Vo): "" and "a" and "foobar".
    assert fnv1a_32("") == 0x811C9DC5
    assert fnv1a_32("a") == 0xE40C292C
    assert fnv1a_32("foobar") == 0xBF9CF968


def test_stale_segments_of_one_step_are_found_and_only_those(tmp_path):
    stem = f"{fnv1a_32('77.1'):x}"
    mine = [f"mpich_shm_{stem}_0", f"mpich_vci_{stem}_0", f"mpich_shm_{stem}_3"]
    others = [f"mpich_shm_{fnv1a_32('77.2'):x}_0", f"mpich_shm_{stem}0_0", "unrelated"]
    for name in mine + others:
        (tmp_path / name).write_bytes(b"")
    assert stale_mpich_segments("77.1", str(tmp_path)) == sorted(str(tmp_path / name) for name in mine)


def test_cleaning_needs_a_job_step():
    with pytest.raises(MpitrainError, match="inside a Slurm job step"):
        clean_next_step({})
