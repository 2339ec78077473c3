"""Collective-mismatch detection (comm/fingerprint.py): every kind of mismatch is caught and named
with both ranks and call sites, under dp, tp, pp and ps, and the job stops at once; and the
public collectives refuse dtypes they cannot sum, with one line, at any size."""

import os
import re
import sys
import time

import numpy as np
import pytest
from mpi4py import MPI

import mismatches
from harness import run_on_root
from mpitrain.comm import allgather, allreduce, fingerprint, reduce_scatter
from mpitrain.comm.fingerprint import EXIT_MISMATCH, decode, describe, encode
from mpitrain.errors import MpitrainError

SCRIPT = os.path.join(os.path.dirname(__file__), "mismatches.py")
WAIT_S = 1.0  # MPITRAIN_CHECK_WAIT_S of the missing-participant cases
SITE = r"at \w+\.py:\d+"


def call(operation: str, dtype: str, length: int, extra: str = "") -> str:
    """The checker's text for one side, as a regex: 'allreduce(float32 x 1,024, ring) at f.py:12'."""
    return re.escape(f"{operation}({dtype} x {length:,}{extra})") + " " + SITE


def mismatch(left: str, right: str) -> str:
    return f"^mpitrain: collective mismatch: rank 0 calls {left} but rank 1 {right}$"


LENGTH = mismatches.LENGTHS
CASES = {
    "length": mismatch(call("allreduce", "float32", LENGTH[0], ", ring"),
                       "calls " + call("allreduce", "float32", LENGTH[1], ", ring")),
    "dtype": mismatch(call("allreduce", mismatches.DTYPES[0], 16, ", ring"),
                      "calls " + call("allreduce", mismatches.DTYPES[1], 16, ", ring")),
    "operation": mismatch(call("allreduce", "float32", 16, ", ring"), "calls " + call("allgather", "float32", 16, ", ring")),
    "algorithm": mismatch(call("allreduce", "float32", 16, f", {mismatches.ALGORITHMS[0]}"),
                          "calls " + call("allreduce", "float32", 16, f", {mismatches.ALGORITHMS[1]}")),
    "missing": mismatch(call("allreduce", "float32", 16, ", ring"), f"has not joined it within {WAIT_S:g} s"),
    "dp": mismatch(call("allreduce", "float32", LENGTH[0], ", ring").replace(SITE, r"at buckets\.py:\d+"),
                   "calls " + call("allreduce", "float32", LENGTH[1], ", ring")),
    "tp": mismatch(call("tensor-parallel sum", "float32", 4 * mismatches.TP_COLUMNS[0], ", ring"),
                   "calls " + call("tensor-parallel sum", "float32", 4 * mismatches.TP_COLUMNS[1], ", ring")),
    "pp": mismatch(call("send", "float32", 4 * mismatches.PP_WIDTHS[0], ", tag 0"),
                   "calls " + call("recv", "float32", 4 * mismatches.PP_WIDTHS[1], ", tag 0")),
    # Stage 0 sends micro-batch 1's activation (tag 2) while stage 1 waits for micro-batch 0's (tag 0).
    "pp-tag": mismatch(call("send", "float32", 32, f", tag {2 * mismatches.PP_MICRO[0]}"),
                       "calls " + call("recv", "float32", 32, f", tag {2 * mismatches.PP_MICRO[1]}")),
}


def run_case(comm, case: str, *args: str) -> tuple[dict, float]:
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    started = time.monotonic()
    done = run_on_root(comm, [mpirun, "-n", "2", sys.executable, SCRIPT, case, *args], timeout=60,
                       MPITRAIN_CHECK_WAIT_S=str(WAIT_S))
    return done, time.monotonic() - started


def reported(done: dict) -> list[str]:
    return [line for line in done["stderr"].splitlines() if "collective mismatch" in line]


@pytest.mark.parametrize("case", sorted(CASES))
def test_mismatch_is_named_and_stops_the_job(comm, case):
    done, elapsed = run_case(comm, case)
    lines = reported(done)
    assert done["returncode"] == EXIT_MISMATCH, done
    assert len(lines) == 1 and re.match(CASES[case], lines[0]), (lines, CASES[case])
    # MPI start-up of the nested job (about a second here) plus the wait of the missing cases.
    assert elapsed < 10 + WAIT_S, f"took {elapsed:.1f} s"


def test_parameter_server_push_mismatch_is_named(comm, shared_dir):
    """The worker believes the server's range of θ is one value short: the first θ answer is named."""
    done, _ = run_case(comm, "ps", shared_dir)
    lines = reported(done)
    assert done["returncode"] == EXIT_MISMATCH, done
    model = [int(width) for width in "6-4-3".split("-")]
    n_params = sum(a * b + b for a, b in zip(model, model[1:]))
    expected = mismatch(call("recv", "float32", n_params - mismatches.PS_SHORT_BY).replace(SITE, r"at ps_train\.py:\d+"),
                        "calls " + call("send", "float32", n_params, ", tag 62").replace(SITE, r"at ps_server\.py:\d+"))
    assert len(lines) == 1 and re.match(expected, lines[0]), (lines, expected)


def test_matching_calls_pass_and_are_counted(comm):
    before = fingerprint.CHECK.calls
    buf = np.arange(10, dtype=np.float64)
    allreduce(buf, comm, "ring")
    np.testing.assert_array_equal(buf, np.arange(10) * comm.size)
    expected = 1 if comm.size > 1 else 0
    assert fingerprint.CHECK.calls - before == expected


def test_fingerprint_round_trip():
    record = encode("allreduce", "rd", np.float32, 812042, None, "buckets.py:88", group=7)
    fp = decode(record)
    assert fp == {"operation": "allreduce", "algorithm": "rd", "dtype": "float32", "length": 812042, "tag": "",
                  "group": 7, "site": "buckets.py:88"}
    assert describe(fp) == "allreduce(float32 x 812,042, rd) at buckets.py:88"


@pytest.mark.parametrize("collective", [allreduce, reduce_scatter, allgather])
@pytest.mark.parametrize("dtype", [bool, object])
def test_unsummable_dtypes_are_refused_alike_at_every_size(comm, collective, dtype):
    """bool and object buffers: one message, the same at 1000 and 2^20 elements and on one rank."""
    messages = set()
    for size in (1000, 1 << 20):
        for group in (comm, MPI.COMM_SELF):
            with pytest.raises(MpitrainError) as error:
                collective(np.zeros(size, dtype=dtype), group)
            messages.add(str(error.value))
    name = np.dtype(dtype).name
    assert messages == {f"{collective.__name__}: a {name} buffer cannot be summed over ranks; use an integer, "
                        "floating or complex dtype (uint8 for flags)"}
