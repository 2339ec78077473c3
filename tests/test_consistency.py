"""The start-up check: ranks launched with different settings stop with one message naming the
ranks and the fields, instead of training different models or hanging."""

from harness import mpitrain_argv, run_on_root
from mpitrain.comm.consistency import check_consistent, describe_mismatch, digest


def test_equal_fields_pass(comm):
    check_consistent(comm, {"lr": 0.1, "model": "8-4-2", "shape": [3, 4]}, "configuration")


def test_digest_ignores_key_order_but_not_values():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 1.5})


def test_mismatch_names_fields_values_and_ranks():
    per_rank = [{"lr": 0.1, "model": "8-4-2"}, {"lr": 0.1, "model": "8-4-2"}, {"lr": 0.2, "model": "8-4-2"},
                {"lr": 0.2, "model": "8-5-2"}]
    assert describe_mismatch(per_rank) == \
        'ranks differ in lr (0.1 on ranks 0, 1; 0.2 on ranks 2, 3), model ("8-4-2" on ranks 0, 1, 2; "8-5-2" on rank 3)'


def test_mpmd_launch_with_different_flags_stops_naming_ranks_and_field(comm):
    """`mpirun -n 1 ... --lr 0.1 : -n 1 ... --lr 0.2`: every rank stops with the same one-line error."""
    common = ["train", "--model", "8-4-3", "--synth-samples", "200", "--batch-size", "8", "--steps", "2",
              "--device", "cpu", "--no-progress"]
    first = mpitrain_argv(1, *common, "--lr", "0.1")
    second = mpitrain_argv(1, *common, "--lr", "0.2")[first.index("-n"):]
    done = run_on_root(comm, first + [":"] + second, timeout=60)
    lines = [line for line in (done["stdout"] + done["stderr"]).splitlines() if line.startswith("mpitrain: error")]
    assert done["returncode"] == 2, done
    expected = "mpitrain: error: inconsistent configuration: ranks differ in lr (0.1 on rank 0; 0.2 on rank 1)"
    assert lines == [expected], done
