"""The preemption flag records SIGUSR1/SIGTERM/SIGINT and puts the previous handlers back; Ctrl-C
under mpirun stops every rank at one checkpointed step."""

import os
import signal
import subprocess
import time

import pytest

from harness import clean_env, mpitrain_argv
from mpitrain.checkpoint import checkpoint_name
from mpitrain.preempt import EXIT_INTERRUPTED, EXIT_PREEMPTED, Preempted, PreemptionFlag


def wait_for(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)


def test_signals_are_recorded_not_fatal():
    flag = PreemptionFlag()
    try:
        assert flag.signum == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        wait_for(lambda: flag.signum)
        assert flag.signum == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(lambda: flag.signum == signal.SIGTERM)
        assert flag.signum == signal.SIGTERM
    finally:
        flag.restore()


def test_restore_puts_back_the_previous_handlers():
    previous = signal.getsignal(signal.SIGTERM)
    PreemptionFlag().restore()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_requeue_status_is_distinct():
    assert EXIT_PREEMPTED not in (0, 1, 2, 124, 137, 143)


def test_a_second_sigint_stops_at_once():
    previous = signal.getsignal(signal.SIGINT)  # SIG_IGN in a shell's background job, else Python's
    flag = PreemptionFlag(checkpoints=False)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        wait_for(lambda: flag.signum)
        assert flag.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler raises here, in the main thread
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGINT) is previous


def test_without_checkpoints_only_sigint_is_watched():
    term = signal.getsignal(signal.SIGTERM)
    flag = PreemptionFlag(checkpoints=False)
    try:
        assert signal.getsignal(signal.SIGTERM) is term and signal.getsignal(signal.SIGINT) == flag._record
    finally:
        flag.restore()


def test_exit_status_says_whether_a_checkpoint_was_written():
    assert Preempted(3, "ck/ckpt-00000003.h5", "SIGINT on rank(s) 0").exit_status == EXIT_PREEMPTED
    stopped = Preempted(3, None, "SIGINT on rank(s) 0")
    assert stopped.exit_status == EXIT_INTERRUPTED == 128 + signal.SIGINT
    assert "nothing saved" in str(stopped)


def _rank_pids(launcher: int) -> list[int]:
    """The processes under `launcher` that run mpitrain (its ranks)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    found, todo = [], [launcher]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            todo.append(child)
            try:
                with open(f"/proc/{child}/cmdline", "rb") as handle:
                    if b"mpitrain" in handle.read():
                        found.append(child)
            except OSError:
                pass
    return found


def _segments(pids: list[int]) -> set[str]:
    """The MPICH shared-memory names the ranks have mapped (listed even once unlinked)."""
    names = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as handle:
                for line in handle:
                    path = line.split(None, 5)[5].strip() if len(line.split(None, 5)) == 6 else ""
                    if path.startswith("/dev/shm/mpich_"):
                        names.add(path.removesuffix(" (deleted)"))
        except OSError:
            pass
    return names


def _interrupt_job(argv: list[str]) -> dict:
    """Start the job, wait for its first epoch line, note its ranks' segments, send SIGINT to mpirun."""
    job = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        lines = []
        for line in job.stdout:
            lines.append(line)
            if line.startswith("epoch 1 "):
                break
        segments = _segments(_rank_pids(job.pid))
        job.send_signal(signal.SIGINT)
        out, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    return {"returncode": job.returncode, "stdout": "".join(lines) + out, "stderr": err, "segments": sorted(segments)}


def test_ctrl_c_under_mpirun_checkpoints_and_leaves_no_segment(comm, shared_dir):
    """SIGINT to mpirun (as Ctrl-C in a terminal): every rank stops at one agreed step, the
    checkpoint of that step is written, one line says so, exit 75; the run's /dev/shm names are gone."""
    folder = os.path.join(shared_dir, "ck")
    argv = mpitrain_argv(2, "train", "--model", "12-16-3", "--synth-samples", "600", "--batch-size", "20",
                         "--epochs", "100000", "--device", "cpu", "--checkpoint-dir", folder)
    result = None
    if comm.rank == 0:
        result = _interrupt_job(argv)
    arrived = comm.Ibarrier()
    while not arrived.Test():
        time.sleep(0.01)
    result = comm.bcast(result, root=0)
    assert result["returncode"] == EXIT_PREEMPTED, result
    stopped = [line for line in result["stderr"].splitlines() if line.startswith("mpitrain: interrupted by SIGINT")]
    assert len(stopped) == 1 and "Traceback" not in result["stderr"], result["stderr"]
    step = int(stopped[0].split("stopped after step ")[1].split(",")[0])
    assert f"checkpoint {os.path.join(folder, checkpoint_name(step))}" in stopped[0]
    assert os.path.exists(os.path.join(folder, checkpoint_name(step)))
    assert result["segments"], "found no shared-memory segment of the job to check"
    assert [path for path in result["segments"] if os.path.exists(path)] == []


def test_sigint_without_a_checkpoint_folder_stops_every_rank_at_one_step(comm, small_classification, monkeypatch):
    """Ctrl-C on the last rank during step 3: every rank raises Preempted after step 4 (the next
    agreement) with nothing saved, which the command line turns into exit 130."""
    import mpitrain.train
    from mpitrain.config import TrainConfig

    schedule = mpitrain.train.schedule

    def scheduled(kind, base_lr, index, total, warmup, **options):
        if index == 2 and comm.rank == comm.size - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return schedule(kind, base_lr, index, total, warmup, **options)

    monkeypatch.setattr(mpitrain.train, "schedule", scheduled)
    settings = TrainConfig(data=small_classification, model="12-16-3", batch_size=18, device="cpu", progress=False,
                           steps=20)
    previous = signal.getsignal(signal.SIGINT)
    try:
        mpitrain.train.train(settings, comm)
        stopped = None
    except Preempted as stop:
        stopped = (stop.step, stop.path, stop.reason, stop.exit_status)
    everyone = comm.allgather(stopped)
    assert everyone == [(4, None, f"SIGINT on rank(s) {comm.size - 1}", EXIT_INTERRUPTED)] * comm.size
    assert signal.getsignal(signal.SIGINT) is previous
