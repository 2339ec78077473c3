"""The memory check's count of the model (memory.py's model_bytes) against closed forms: it is the
plan's fullest rank of the layout the flags describe, and it reads no tuning file. Pure, so every
rank runs it alike; that the plan's counts equal a run's metrics is tests/test_plan_bytes.py's."""

import dataclasses

import pytest

from mpitrain.comm import tunefile
from mpitrain.config import TrainConfig, validate
from mpitrain.errors import MpitrainError
from mpitrain.memory import model_bytes
from mpitrain.parallel.grid import dense_param_counts
from mpitrain.plan.cost import config_spec, usage

WIDTHS = [16, 32, 32, 8]
ITEMSIZE = 4  # float32


def settings(**overrides) -> TrainConfig:
    base = dict(model="-".join(map(str, WIDTHS)), batch_size=64, device="cpu", progress=False)
    return validate(dataclasses.replace(TrainConfig(), **{**base, **overrides}))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_parameter_server_counts_its_fullest_rank_worker_or_server(mode):
    params = sum(dense_param_counts(WIDTHS)) * ITEMSIZE
    # 3 workers + 1 server: the server, with Adam's two buffers of the whole range, holds the most;
    # in sync mode its gradients are the sum and a slot per worker (async receives into the sum).
    slots = 3 if mode == "sync" else 0
    assert model_bytes(settings(sync="ps", ps_mode=mode), WIDTHS, 4) == {
        "parameters": params, "gradients": (1 + slots) * params, "optimizer state": 2 * params, "activations": 0}
    # 1 worker + 3 servers: the worker, whose CPU link exchanges the model's own buffers (no copies),
    # and which keeps every layer's input for backward: 64 rows of 16 + 32 + 32 values.
    assert model_bytes(settings(sync="ps", ps_mode=mode, servers=3), WIDTHS, 4) == {
        "parameters": params, "gradients": params, "optimizer state": 0,
        "activations": 64 * sum(WIDTHS[:-1]) * ITEMSIZE}


def test_a_stale_synchronous_server_counts_its_bound_of_slots():
    """--staleness K: up to K + 1 steps of W gradients each are held at once, besides the sum."""
    params = sum(dense_param_counts(WIDTHS)) * ITEMSIZE
    assert model_bytes(settings(sync="ps", staleness=2), WIDTHS, 4)["gradients"] == (1 + 3 * 3) * params


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_a_grid_counts_zero_stages_and_sums_to_the_plans_total(zero):
    config = settings(zero=zero)
    parts = model_bytes(config, WIDTHS, 4)
    params = sum(dense_param_counts(WIDTHS)) * ITEMSIZE
    assert parts["optimizer state"] == 2 * params // (4 if zero else 1)
    memory = usage(config_spec(config, 4, WIDTHS), config, WIDTHS, 4)[1]
    assert sum(parts.values()) == memory["total_bytes_per_rank"]


def test_hand_split_stages_are_counted_as_given():
    balanced = model_bytes(settings(pp=2), WIDTHS, 2)
    first_heavy = model_bytes(settings(pp=2, stages="2,1"), WIDTHS, 2)
    assert first_heavy["parameters"] == sum(dense_param_counts(WIDTHS)[:2]) * ITEMSIZE != balanced["parameters"]


def test_the_memory_check_reads_no_tuning_file(tmp_path, monkeypatch):
    """Every rank counts memory: the run reads the tuning file on one rank only, so the count
    must not read it at all (what `auto` and `hier` choose changes bytes, not memory)."""
    broken = tmp_path / "tune.json"
    broken.write_text("not json")
    monkeypatch.setenv(tunefile.ENV_FILE, str(broken))
    # The plan reads it to count bytes: `auto`'s thresholds, and hier's crossover on 2 nodes of 2.
    for algorithm, per_node in (("auto", 4), ("hier", 2)):
        config = settings(allreduce=algorithm)
        with pytest.raises(MpitrainError, match="tuning file"):
            usage(config_spec(config, 4, WIDTHS), config, WIDTHS, per_node)
        assert model_bytes(config, WIDTHS, 4)["parameters"] == sum(dense_param_counts(WIDTHS)) * ITEMSIZE
