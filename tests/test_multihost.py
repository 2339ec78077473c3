"""mpitrain across two hosts with their own network stacks (.ci/hosts-up.sh), 2 ranks on each.

Every check starts its own `mpiexec -hosts hostA:2,hostB:2 -n 4` job, once, from rank 0 (the
outer world size does not matter), so the node split comes from where the ranks really run,
not from MPITRAIN_RANKS_PER_NODE, and every inter-host byte crosses the veth link as TCP.
Skips, with the reason, where the hosts cannot be made: not root, namespaces refused, no mpiexec.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from mpi4py import MPI

from harness import clean_env
from mpitrain.checkpoint import list_checkpoints, load_parameters
from mpitrain.comm import tune

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTS = ("hostA", "hostB")
LAYOUT = f"{HOSTS[0]}:2,{HOSTS[1]}:2"
# Four dense layers, so two pipeline stages of two layers each fit; widths not divisible by 2.
TRAIN = ("train", "--model", "12-10-9-7-3", "--synth-samples", "480", "--batch-size", "12", "--sampler", "global",
         "--dtype", "float64", "--device", "cpu", "--optimizer", "adam", "--lr", "0.01", "--seed", "5", "--no-progress")
RTOL = 1e-10


def on_root(comm, function, *args):
    """function(*args) on rank 0 only (nested jobs start once), its result or exception on every rank.
    The other ranks sleep while they wait, leaving the cores to the nested job."""
    result = None
    if comm.rank == 0:
        try:
            result = (function(*args), None)
        except Exception as exc:  # re-raised on every rank below, so all ranks fail alike
            result = (None, f"{type(exc).__name__}: {exc}")
    arrived = comm.Ibarrier()
    while not arrived.Test():
        time.sleep(0.01)
    value, error = comm.bcast(result, root=0)
    if error is not None:
        raise AssertionError(f"on rank 0: {error}")
    return value


def job_env() -> dict:
    """The environment of a nested job: no outer launcher's variables, no emulated nodes, and a
    tuning file that does not exist, so `auto` uses its defaults whatever this machine measured."""
    env = clean_env(MPITRAIN_TUNE_FILE=os.path.join(tempfile.gettempdir(), f"mpitrain-no-tune-{os.getpid()}", "none.json"))
    env.pop("MPITRAIN_RANKS_PER_NODE", None)
    return env


def run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=job_env())
    assert done.returncode == 0, f"{' '.join(argv)}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def why_no_hosts() -> str | None:
    if os.geteuid() != 0:
        return "two-host tests need root (network and UTS namespaces, veth)"
    if shutil.which("unshare") is None or shutil.which("nsenter") is None or shutil.which("ip") is None:
        return "two-host tests need unshare, nsenter and ip (util-linux, iproute2)"
    if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "mpiexec")):
        return f"two-host tests need MPICH's mpiexec next to {sys.executable}"
    probe = subprocess.run(["unshare", "--uts", "--net", "--mount", "true"], capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        return f"this machine refuses namespaces: {probe.stderr.strip()}"
    return None


class Hosts:
    """The two hosts of one test module, made by .ci/hosts-up.sh under a temporary folder."""

    def __init__(self, folder: str):
        self.dir = os.path.join(folder, "hosts")
        run([os.path.join(REPO, ".ci", "hosts-up.sh"), self.dir], timeout=60)

    def mpiexec(self, *args: str, layout: str = LAYOUT) -> list[str]:
        return [os.path.join(self.dir, "mpiexec"), "-hosts", layout, "-n", "4", *args]

    def on(self, host: str, command: str) -> str:
        return run([os.path.join(self.dir, "on"), host, command], timeout=30).stdout

    def link_bytes(self, host: str) -> tuple[int, int]:
        """(received, sent) bytes on the host's end of the link, from its /proc/net/dev."""
        fields = self.on(host, "grep mpt0: /proc/net/dev").split(":", 1)[1].split()
        return int(fields[0]), int(fields[8])

    def processes(self, host: str, *words: str) -> list[int]:
        """Pids of the processes running on `host` (in its network namespace) whose command line
        holds every one of `words`. The pid namespace is shared, so a plain pgrep would see all."""
        with open(os.path.join(self.dir, f"{host}.pid")) as handle:
            netns = os.readlink(f"/proc/{handle.read().strip()}/ns/net")
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.readlink(f"/proc/{pid}/ns/net") != netns:
                    continue
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    argv = handle.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            if all(word in argv for word in words):
                found.append(int(pid))
        return sorted(found)

    def down(self) -> None:
        subprocess.run([os.path.join(REPO, ".ci", "hosts-down.sh"), self.dir], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def hosts():
    comm = MPI.COMM_WORLD.Dup()
    reason = on_root(comm, why_no_hosts)
    if reason is not None:
        print(f"\ntest_multihost: skipped: {reason}")
        comm.Free()
        pytest.skip(reason)
    folder = on_root(comm, tempfile.mkdtemp, "", "mpitrain-hosts.")
    made = on_root(comm, Hosts, folder)
    yield made
    on_root(comm, lambda: (made.down(), shutil.rmtree(folder, ignore_errors=True)))
    comm.Free()


def mpitrain_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "mpitrain", *args]


# ---------------------------------------------------------------------------- hosts and collectives


def test_node_split_collectives_and_link(comm, hosts):
    """2 + 2 ranks by host, local ranks 0, 1 on each; ring, rd, hier and auto equal MPI Allreduce;
    the bytes the ring must move between the hosts did cross the veth link (not shared memory)."""

    def probe():
        before = hosts.link_bytes(HOSTS[1])
        out = run(hosts.mpiexec(sys.executable, os.path.join(REPO, "tests", "multihost_probe.py"))).stdout
        after = hosts.link_bytes(HOSTS[1])
        return json.loads(out.strip().splitlines()[-1]), [b - a for a, b in zip(before, after)]

    report, (received, sent) = on_root(comm, probe)
    ranks = sorted(report["ranks"], key=lambda entry: entry["rank"])
    assert [entry["host"] for entry in ranks] == [HOSTS[0]] * 2 + [HOSTS[1]] * 2
    assert [(entry["local_rank"], entry["local_size"]) for entry in ranks] == [(0, 2), (1, 2)] * 2
    assert {entry["hier_nodes"] for entry in ranks} == {2}
    unequal = [name for name, same in report["equal"].items() if not same]
    assert not unequal, f"differ from MPI Allreduce: {unequal}"
    # The ring 0-1-2-3 crosses from hostA to hostB once (1 -> 2) and back once (3 -> 0); each
    # crossing carries 2 (p - 1) / p of the buffer, so each direction of the link saw at least that.
    p = report["world_size"]
    at_least = report["ring_bytes"] * 2 * (p - 1) // p
    assert received >= at_least and sent >= at_least, (received, sent, at_least)
    # No tuning file (see job_env): auto follows the defaults measured across two nodes.
    expected = tune.Thresholds(tune.default_table(p, 2))
    assert report["auto"] == {str(nbytes): expected(int(nbytes)) for nbytes in report["auto"]}


def test_tune_learns_the_two_node_layout(comm, hosts, shared_dir):
    """`mpitrain tune` on 2 + 2 ranks saves thresholds under the layout p4-n2, and where hier
    crosses the link from every local rank (measured from 16 KiB to the largest size)."""
    path = os.path.join(shared_dir, "tune.json")
    out = on_root(comm, lambda: run(hosts.mpiexec(*mpitrain_argv("tune", "--max-mb", "1", "--trials", "1", "--out", path))).stdout)
    with open(path) as handle:  # shared_dir is on the one file system every rank sees
        layouts = json.load(handle)["layouts"]
    assert list(layouts) == [tune.layout_key(4, 2)], out
    table = tune.check_table(layouts["p4-n2"]["thresholds"], path)
    assert {name for _, name in table} <= set(tune.CANDIDATES)
    assert len(layouts["p4-n2"]["measured"]["bytes"]) == (1 << 20).bit_length() - 3
    measured = layouts["p4-n2"]["measured"]["hier"]
    assert measured["bytes"] == [1 << e for e in range(14, 21)] and set(measured["seconds"]) == {"two-level", "leaders"}
    crossover = layouts["p4-n2"]["hier_two_level_bytes"]
    assert crossover is None or crossover in measured["bytes"]
    assert "hier crosses nodes from every local rank" in out, out


# ---------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def serial_parameters(hosts, tmp_path_factory):
    """The one-process run of TRAIN for 10 steps, every rank holding its parameters."""
    comm = MPI.COMM_WORLD.Dup()
    folder = comm.bcast(str(tmp_path_factory.mktemp("serial")) if comm.rank == 0 else None, root=0)
    path = os.path.join(folder, "serial.h5")
    on_root(comm, run, mpitrain_argv(*TRAIN, "--steps", "10", "--save", path))
    parameters = on_root(comm, load_parameters, path)
    comm.Free()
    return parameters


def assert_same_parameters(result: dict, expected: dict) -> None:
    assert result.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(result[name], value, rtol=RTOL, atol=RTOL * np.abs(value).max(), err_msg=name)


@pytest.mark.parametrize("layout", [(), ("--tp", "2", "--pp", "2", "--micro-batches", "2")], ids=["dp4", "tp2-pp2"])
def test_training_equals_one_process_run(comm, hosts, serial_parameters, shared_dir, layout):
    path = os.path.join(shared_dir, "two-hosts.h5")
    out = on_root(comm, lambda: run(hosts.mpiexec(*mpitrain_argv(*TRAIN, *layout, "--steps", "10", "--save", path))).stdout)
    assert "4 rank(s)" in out
    assert_same_parameters(on_root(comm, load_parameters, path), serial_parameters)


def test_checkpoint_written_on_one_host_resumes_on_the_other(comm, hosts, shared_dir):
    """Rank 0 on hostA writes the step-6 checkpoint; the job resumed with rank 0 on hostB ends
    bit-identical to an uninterrupted 12-step run."""
    checkpoints, full, resumed = (os.path.join(shared_dir, name) for name in ("checkpoints", "full.h5", "resumed.h5"))
    layout_swapped = f"{HOSTS[1]}:2,{HOSTS[0]}:2"

    def runs():
        run(hosts.mpiexec(*mpitrain_argv(*TRAIN, "--steps", "12", "--save", full)))
        run(hosts.mpiexec(*mpitrain_argv(*TRAIN, "--steps", "6", "--checkpoint-dir", checkpoints, "--checkpoint-every", "6")))
        written = [step for step, _ in list_checkpoints(checkpoints)]
        out = run(hosts.mpiexec(*mpitrain_argv(*TRAIN, "--steps", "12", "--checkpoint-dir", checkpoints, "--resume", "auto",
                                               "--save", resumed), layout=layout_swapped)).stdout
        return written, out, load_parameters(full), load_parameters(resumed)

    written, out, expected, result = on_root(comm, runs)
    assert written == [6]
    assert "resumed from" in out, out
    assert expected.keys() == result.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(result[name], value, err_msg=name)


# ---------------------------------------------------------------------------- failure


def test_kill_9_of_a_rank_on_the_second_host_ends_the_job(comm, hosts, shared_dir):
    """SIGKILL to one rank on hostB, mid-training: the whole job exits non-zero within 10 s."""
    metrics = os.path.join(shared_dir, "metrics.jsonl")
    limit_s = 10

    def kill_one():
        argv = hosts.mpiexec(*mpitrain_argv(*TRAIN, "--steps", "1000000", "--synth-samples", "960", "--metrics", metrics))
        job = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=job_env(),
                               start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):  # an epoch done: all ranks train
                assert job.poll() is None, f"the job ended early: {job.communicate()[0][-2000:]}"
                assert time.monotonic() < deadline, "no epoch finished within 60 s"
                time.sleep(0.1)
            victims = hosts.processes(HOSTS[1], "mpitrain", "train", metrics)
            assert len(victims) == 2, f"expected 2 ranks on {HOSTS[1]}, found pids {victims}"
            os.kill(victims[-1], signal.SIGKILL)
            killed = time.monotonic()
            try:
                job.wait(timeout=limit_s)
            except subprocess.TimeoutExpired:
                return None, time.monotonic() - killed, ""
            return job.returncode, time.monotonic() - killed, job.communicate()[0][-1500:]
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait(timeout=10)

    returncode, seconds, output = on_root(comm, kill_one)
    assert returncode is not None, f"the job was still running {seconds:.1f} s after the kill"
    assert returncode != 0, output
    assert seconds < limit_s
