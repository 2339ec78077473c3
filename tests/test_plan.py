"""The plan's cost model against closed forms, its feasibility rules, the profile format, the
`mpitrain plan` command and `train --layout auto`. All pure but the last, so every rank runs them alike."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest

from mpitrain.cli import run
from mpitrain.comm import hier, local_rank_and_size
from mpitrain.comm.traffic import ring_equivalent
from mpitrain.config import TrainConfig, validate
from mpitrain.errors import MpitrainError
from mpitrain.parallel.grid import dense_param_counts
from mpitrain.parallel.pipeline import bubble_fraction
from mpitrain.plan import collectives, profile, show
from mpitrain.plan.cost import Prediction, Spec, usage
from mpitrain.plan.search import candidates, explain, search
from mpitrain.plan.timing import Machine, optimizer_time, pipeline_bubble, predict

WIDTHS = [16, 32, 32, 8]


def plan_config(**overrides) -> TrainConfig:
    base = dict(model="-".join(map(str, WIDTHS)), batch_size=64, device="cpu", progress=False)
    return validate(dataclasses.replace(TrainConfig(), **{**base, **overrides}))


def free_profile(**changes) -> dict:
    """The built-in profile with the costs a test does not look at set to (almost) nothing."""
    base = profile.builtin()
    base.update({"op_overhead_s": 0.0, "message_overhead_s": 0.0, "step_overhead_s": 0.0, **changes})
    return profile.check(base, "test")


# ---------------------------------------------------------------------------- bytes, closed forms


@pytest.mark.parametrize("size", [2, 3, 4, 8])
def test_ring_bytes_are_2_p_minus_1_over_p_of_the_buffer(size):
    count = 24 * size
    for rank in range(size):
        assert collectives.ring_sent(count, size, rank) == 2 * (size - 1) * count // size
    assert collectives.ring_sent(count, size, 0) * 4 == ring_equivalent(count * 4, size)
    uneven = count + size - 1  # every chunk still leaves each rank p-1 times per phase
    assert sum(collectives.ring_sent(uneven, size, r) for r in range(size)) == 2 * (size - 1) * uneven


def test_recursive_doubling_bytes_fold_the_ranks_above_a_power_of_two():
    count = 10
    assert [collectives.rd_sent(count, 8, r) for r in range(8)] == [3 * count] * 8
    # 6 ranks: 2 extra; ranks 0 and 2 hand over once, ranks 1 and 3 do 2 rounds and hand back.
    assert [int(collectives.rd_sent(count, 6, r)) for r in range(6)] == [count, 3 * count, count, 3 * count,
                                                                         2 * count, 2 * count]


def test_hierarchical_sends_nothing_within_a_node_and_rings_across():
    node, local = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 0, 1, 0, 1])
    assert collectives.hier_sent(1000, 4, node[:2], local[:2], [2]).tolist() == [0, 0]
    # Nodes of 2 ranks and a buffer of TWO_LEVEL_BYTES: local rank j rings chunk j with the other
    # nodes' rank j.
    count = hier.TWO_LEVEL_BYTES // 4
    assert collectives.hier_sent(count, 4, node, local, [2, 2, 2]).tolist() == [
        collectives.ring_sent(count // 2, 3, n) for n in node.tolist()]
    # One element less: the leaders alone ring the whole buffer.
    assert collectives.hier_sent(count - 1, 4, node, local, [2, 2, 2]).tolist() == [
        collectives.ring_sent(count - 1, 3, n) if j == 0 else 0 for n, j in zip(node.tolist(), local.tolist())]
    # Unequal nodes: only each node's first rank rings, the whole buffer.
    node, local = np.array([0, 0, 1]), np.array([0, 1, 0])
    assert collectives.hier_sent(999, 4, node, local, [2, 1]).tolist() == [999, 0, 999]


def test_zero_stages_divide_optimizer_state_then_gradients_by_dp():
    config = plan_config()
    params = sum(dense_param_counts(WIDTHS))
    assert params % 4 == 0
    memory = {zero: usage(Spec("grid", 4, zero=zero), config, WIDTHS, 4)[1] for zero in (0, 1, 2)}
    assert memory[0]["optimizer_bytes_per_rank"] == 2 * params * 4  # Adam: m and v, float32
    assert memory[1]["optimizer_bytes_per_rank"] == memory[0]["optimizer_bytes_per_rank"] // 4
    assert memory[1]["grad_bytes_per_rank"] == memory[0]["grad_bytes_per_rank"] == params * 4
    assert memory[2]["param_bytes_per_rank"] == memory[0]["param_bytes_per_rank"]
    # Stage 2 keeps 1/dp of the gradients and two staging buckets, where that is smaller than the
    # whole (comm/buckets.py): not with one 1 MiB bucket for the whole model...
    assert memory[2]["grad_bytes_per_rank"] == params * 4
    # ...but with buckets of 32 values every layer is cut into pieces of whole rows of at most 32
    # values (layer 1: one row of 32; layer 2: four rows of 8), so the slots hold 2 x 32 values.
    small = usage(Spec("grid", 4, zero=2), plan_config(bucket_mb=32 * 4 / (1 << 20)), WIDTHS, 4)[1]
    assert small["grad_bytes_per_rank"] == (2 * 32 + params // 4) * 4


# ---------------------------------------------------------------------------- time, closed forms


def test_alpha_beta_time_of_each_algorithm():
    alpha, beta, n, bandwidth = 1e-5, 1e-9, 8 << 20, math.inf
    prof = free_profile(links={"intra": {"alpha_s": alpha, "beta_s_per_byte": beta}})
    group = collectives.Group(4, 1, 4)
    segments = math.ceil(n / 4 / (1 << 20))
    assert collectives.ring_time(prof, n, group, bandwidth) == pytest.approx(
        2 * 3 * segments * alpha + 2 * 3 / 4 * n * beta)
    assert collectives.rd_time(prof, n, group, bandwidth) == pytest.approx(2 * (alpha + n * beta))
    assert collectives.rd_time(prof, n, collectives.Group(6), bandwidth) == pytest.approx(4 * (alpha + n * beta))
    assert collectives.p2p_time(prof, n, True) == pytest.approx(alpha + n * beta)
    assert collectives.mpi_time(prof, n, group, bandwidth) == pytest.approx(
        min(2 * (alpha + n * beta), 2 * 3 * segments * alpha + 2 * 3 / 4 * n * beta))
    assert collectives.hier_time(prof, n, collectives.Group(4, 1, 4), 1e9) > 0
    assert collectives.allreduce_time(prof, "ring", n, collectives.Group(1), bandwidth) == 0


def test_a_zero_bucket_costs_its_algorithms_all_reduce_and_a_ring_all_gather_after_a_whole_sum():
    """Under ZeRO the ring's, MPI's and (on one node) hier's two halves are priced as their
    all-reduce; rd, and hier across nodes, sum the whole bucket and then ring the all-gather."""
    from mpitrain.plan.timing import sync_time

    prof = free_profile(links={"intra": {"alpha_s": 1e-5, "beta_s_per_byte": 1e-9},
                               "inter": {"alpha_s": 5e-5, "beta_s_per_byte": 8e-9}})
    n, bandwidth = 4 << 20, 1e10
    one_node, two_nodes = collectives.Group(4, 1, 4), collectives.Group(4, 2, 2)
    for group in (one_node, two_nodes):
        for name in ("ring", "mpi"):
            assert sync_time(prof, name, 1, n, group, bandwidth) == collectives.allreduce_time(prof, name, n, group,
                                                                                              bandwidth)
        half_ring = collectives.allreduce_time(prof, "ring", n, group, bandwidth) / 2
        assert sync_time(prof, "rd", 1, n, group, bandwidth) == pytest.approx(
            collectives.allreduce_time(prof, "rd", n, group, bandwidth) + half_ring)
        hier_sum = collectives.allreduce_time(prof, "hier", n, group, bandwidth)
        assert sync_time(prof, "hier", 2, n, group, bandwidth) == pytest.approx(
            hier_sum + (half_ring if group.nodes > 1 else 0.0))
        assert sync_time(prof, "rd", 0, n, group, bandwidth) == collectives.allreduce_time(prof, "rd", n, group,
                                                                                          bandwidth)


def test_a_zero_bucket_costs_the_measured_curve_of_its_pair_where_the_profile_has_one():
    """A calibrated profile times each algorithm's reduce-scatter + all-gather pair too (kind
    "halves"): ZeRO's buckets take that curve for their group, interpolated; the all-reduce keeps
    its own curve, other groups and algorithms the formulas."""
    from mpitrain.plan.timing import sync_time

    sizes = [1 << 10, 1 << 20, 1 << 30]
    prof = free_profile(collectives=[
        {"algorithm": "hier", "ranks": 4, "nodes": 1, "bytes": sizes, "seconds": [1e-5, 1e-3, 1.0]},
        {"algorithm": "hier", "ranks": 4, "nodes": 1, "bytes": sizes, "seconds": [2e-5, 4e-4, 0.4], "kind": "halves"}])
    group, n, bandwidth = collectives.Group(4, 1, 4), 1 << 20, 1e10
    assert sync_time(prof, "hier", 1, n, group, bandwidth) == pytest.approx(4e-4)
    assert sync_time(prof, "hier", 2, 1 << 25, group, bandwidth) == pytest.approx(
        collectives.interpolate(sizes, [2e-5, 4e-4, 0.4], 1 << 25))
    assert sync_time(prof, "hier", 0, n, group, bandwidth) == pytest.approx(1e-3)
    assert sync_time(prof, "ring", 1, n, group, bandwidth) == collectives.allreduce_time(prof, "ring", n, group,
                                                                                        bandwidth)
    other = collectives.Group(2, 1, 2)
    assert sync_time(prof, "hier", 1, n, other, bandwidth) == collectives.allreduce_time(prof, "hier", n, other,
                                                                                        bandwidth)
    with pytest.raises(MpitrainError, match=r"collectives\[0\].kind 'pair'"):
        profile.check(free_profile(collectives=[{**prof["collectives"][0], "kind": "pair"}]), "test")


def test_zero_layouts_are_listed_with_every_algorithm_but_recursive_doubling():
    specs = candidates(4, 3, 4)
    sharded = {(spec.dp, spec.zero, spec.algorithm) for spec in specs if spec.kind == "grid" and spec.zero}
    assert {(4, zero, name) for zero in (1, 2) for name in ("ring", "hier", "mpi")} <= sharded
    assert not any(name == "rd" for _, _, name in sharded)
    assert {spec.algorithm for spec in specs if spec.kind == "grid" and spec.dp > 1 and not spec.zero} == \
        {"ring", "rd", "hier", "mpi"}
    assert {spec.algorithm for spec in candidates(4, 3, 4, algorithms=("rd",)) if spec.zero} == {"ring"}


def test_a_measured_curve_replaces_the_formula_for_its_group():
    prof = free_profile(collectives=[{"algorithm": "ring", "ranks": 2, "nodes": 1, "bytes": [1000, 4000],
                                      "seconds": [1e-4, 4e-4]}])
    assert collectives.allreduce_time(prof, "ring", 2000, collectives.Group(2), 1e9) == pytest.approx(2e-4)
    assert collectives.allreduce_time(prof, "ring", 8000, collectives.Group(2), 1e9) == pytest.approx(8e-4)
    assert collectives.allreduce_time(prof, "ring", 2000, collectives.Group(4), 1e9) != pytest.approx(2e-4)


@pytest.mark.parametrize("stages, micro", [(2, 1), (2, 4), (3, 6)])
def test_the_bubble_of_equal_stages_is_p_minus_1_over_m_plus_p_minus_1_of_the_pipelined_step(stages, micro):
    busy = 0.37
    bubble = pipeline_bubble({stage: busy for stage in range(stages)}, stages - 1, micro)
    assert bubble / (busy + bubble) == pytest.approx(bubble_fraction(stages, micro))


def test_the_slowest_stage_waits_one_micro_batch_of_each_other_stage():
    assert pipeline_bubble({0: 1.0, 1: 4.0, 2: 2.0}, 1, 4) == pytest.approx((1.0 + 2.0) / 4)
    # In a prediction: a light first stage (16 -> 4) before a heavy one (4 -> 512 -> 512) leaves
    # the heavy one a bubble far below the equal-stage fraction of its busy time.
    p = predict(Spec("grid", 1, pp=2, micro_batches=4), plan_config(batch_size=64), [16, 4, 512, 512], 8,
                free_profile())
    busy = p.terms["compute"] + p.terms["tensor"] + p.terms["pipeline"]
    assert 0 < p.terms["bubble"] < 0.5 * busy * bubble_fraction(2, 4) / (1 - bubble_fraction(2, 4))


def test_without_overlap_the_gradient_sum_is_exposed_whole():
    # Buckets of one layer each: the last layer's sum can run while the first layers compute.
    spec, prof = Spec("grid", 2, algorithm="ring"), free_profile(overlap_efficiency=1.0)
    exposed = predict(spec, plan_config(overlap=False, bucket_mb=1e-3), WIDTHS, 2, prof)
    overlapped = predict(spec, plan_config(bucket_mb=1e-3), WIDTHS, 2, prof)
    itemsize, group = 4, collectives.Group(2, 1, 2)
    whole = sum(collectives.ring_time(prof, (n_in * n_out + n_out) * itemsize, group, prof["memory_bandwidth_per_core"])
                for n_in, n_out in zip(WIDTHS[:-1], WIDTHS[1:]))
    assert exposed.terms["data"] == pytest.approx(whole, rel=0.2)
    assert overlapped.terms["data"] < exposed.terms["data"]


def closed_queue_step(workers: int, think: float, service: float, gradients: int = 3000) -> float:
    """Seconds per W gradients of W workers that each compute for `think` s, then wait for a server
    that takes `service` s per gradient, first come first served: simulated, the async oracle."""
    arrives, free, done = [0.0] * workers, 0.0, []
    for _ in range(gradients):
        worker = min(range(workers), key=arrives.__getitem__)
        free = max(arrives[worker], free) + service
        arrives[worker] = free + think
        done.append(free)
    # Whole rounds of W gradients from the middle on, past the start's transient.
    start, rounds = gradients // 2, (gradients - 1 - gradients // 2) // workers
    return (done[start + rounds * workers] - done[start]) / rounds


@pytest.mark.parametrize("flops, bound", [(1e7, "workers"), (1e12, "server")])
def test_async_parameter_server_is_a_closed_queue_of_workers_and_a_server(flops, bound):
    """Slow GEMMs: the workers pace the job and a step is one worker's cycle z + t; fast GEMMs: the
    server does, a step is W gradients' service W t, and the difference is the wait in its queue."""
    prof = free_profile(cores_per_node=4, gemm=[], gemm_flops_per_s={"float32": flops}, step_overhead_s=1e-4,
                        links={"intra": {"alpha_s": 1e-6, "beta_s_per_byte": 1e-8}})
    config, workers = plan_config(), 3
    spec = Spec("ps", workers, servers=1, ps_mode="async")
    p = predict(spec, config, WIDTHS, 4, prof)
    params = sum(dense_param_counts(WIDTHS))
    service = 2 * collectives.p2p_time(prof, params * 4, True) + optimizer_time(Machine(prof, 4, "float32"),
                                                                                 config, params, 4)
    think = predict(Spec("ps", workers, servers=1), config, WIDTHS, 4, prof).terms["compute"] + 1e-4
    assert p.step_s == pytest.approx(max(think + service, workers * service))
    assert p.step_s == pytest.approx(closed_queue_step(workers, think, service), rel=1e-9)
    assert p.samples_per_s == pytest.approx(config.batch_size / p.step_s)
    if bound == "workers":
        assert p.terms["server queue"] == 0 and p.dominant == "compute"
    else:
        assert p.terms["server queue"] == pytest.approx(workers * service - think - service)
        assert p.dominant == "server queue"
    # One worker never queues: its cycle is the synchronous step without the sum.
    alone = predict(Spec("ps", 1, servers=1, ps_mode="async"), config, WIDTHS, 2, prof)
    assert alone.terms["server queue"] == 0


def test_parameter_server_layouts_are_listed_in_both_modes_and_labelled_apart(comm, capsys):
    specs = candidates(4, 3, 4)
    ps = [spec for spec in specs if spec.kind == "ps"]
    assert {(spec.dp, spec.servers, spec.ps_mode) for spec in ps} == {
        (w, 4 - w, mode) for w in (3, 2) for mode in ("sync", "async")}
    assert len({spec.describe() for spec in ps}) == len(ps)
    assert len({show._shape(spec) for spec in ps}) == 2  # --plot: one family per mode
    assert not any(spec.kind == "ps" for spec in candidates(4, 3, 4, parameter_server=False))
    run(["plan", "--model", "16-32-32-8", "--batch-size", "64", "--ranks", "4", "--json"])
    out = capsys.readouterr().out
    if comm.rank == 0:
        ranked = json.loads(out)["worlds"]["4"]["ranked"]
        listed = {(p["layout"], p["ps_mode"]) for p in ranked if p["kind"] == "ps"}
        assert ("ps async 3 workers + 1 server(s)", "async") in listed
        assert ("ps sync 3 workers + 1 server(s)", "sync") in listed


def test_an_asynchronous_pick_names_the_fastest_synchronous_layout():
    def made(spec, step):
        return Prediction(spec, step, 64 / step, {"compute": step}, {}, {"total_bytes_per_rank": 0})

    ranked = [made(Spec("ps", 3, servers=1, ps_mode="async"), 1.0), made(Spec("ps", 3, servers=1), 1.5),
              made(Spec("grid", 4), 2.0)]
    line = explain(ranked)
    assert "async applies stale gradients" in line
    assert "the fastest synchronous layout, ps sync 3 workers + 1 server(s), is 1.50x slower" in line
    assert "stale" not in explain(ranked[1:])


# ---------------------------------------------------------------------------- feasibility and ranking


def test_infeasible_layouts_are_listed_with_their_reason():
    config = plan_config(model="16-2-8", batch_size=4)
    ranked, infeasible = search(8, config, [16, 2, 8], 8, free_profile(), memory_limit=None)
    reasons = " | ".join(entry.reason for entry in infeasible)
    assert "--tp 4 exceeds the width 2" in reasons
    assert "smaller than the 8 data-parallel groups" in reasons
    assert "--micro-batches 4 is more than" in reasons
    assert all(p.spec.world == 8 for p in ranked)
    assert [p.step_s for p in ranked] == sorted(p.step_s for p in ranked)
    limit = min(p.memory["total_bytes_per_rank"] for p in ranked)
    kept, refused = search(8, config, [16, 2, 8], 8, free_profile(), memory_limit=limit)
    assert all(p.memory["total_bytes_per_rank"] <= limit for p in kept) and kept
    assert any("over --memory-per-rank" in entry.reason for entry in refused)


# ---------------------------------------------------------------------------- the profile


def test_profile_round_trip_and_a_bad_field_named(comm, tmp_path):
    prof = free_profile(gemm=[{"dtype": "float32", "m": 8, "k": 8, "n": 8, "flops_per_s": 1e9}])
    path = os.path.join(tmp_path, "machine.json")
    profile.save(prof, path)
    assert profile.load(path) == prof
    with open(path, "w") as handle:
        json.dump({**prof, "links": {"intra": {"alpha_s": -1, "beta_s_per_byte": 1e-9}}}, handle)
    with pytest.raises(MpitrainError, match="links.intra.alpha_s"):
        profile.load(path)
    with pytest.raises(MpitrainError, match="field 'cores_per_node' is missing"):
        profile.check({"format": 1}, "x")


def test_the_gemm_rate_of_the_nearest_measured_shape():
    slow = free_profile(gemm=[{"dtype": "float32", "m": 64, "k": 16, "n": 32, "flops_per_s": 1e6}])
    fast = free_profile(gemm=[{"dtype": "float32", "m": 64, "k": 16, "n": 32, "flops_per_s": 1e9}])
    spec, config = Spec("grid", 1), plan_config()
    assert predict(spec, config, WIDTHS, 1, slow).terms["compute"] > 100 * predict(spec, config, WIDTHS, 1,
                                                                                        fast).terms["compute"]


# ---------------------------------------------------------------------------- the command


def test_plan_command_json_and_bad_input(comm, tmp_path, capsys, monkeypatch):
    run(["plan", "--model", "16-32-32-8", "--batch-size", "64", "--ranks", "1,4", "--json"])
    out = capsys.readouterr().out
    if comm.rank == 0:
        result = json.loads(out)
        assert set(result["worlds"]) == {"1", "4"}
        assert result["worlds"]["4"]["pick"]["step_s"] == min(p["step_s"] for p in result["worlds"]["4"]["ranked"])
    with pytest.raises(MpitrainError, match="--ranks '2,x'"):
        run(["plan", "--ranks", "2,x"])
    with pytest.raises(MpitrainError, match="--zero '3'"):
        run(["plan", "--zero", "3"])
    with pytest.raises(MpitrainError, match="--memory-per-rank '12x'"):
        run(["plan", "--memory-per-rank", "12x"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(MpitrainError, match=r"mpitrain\[plot\]"):
        run(["plan", "--plot", os.path.join(tmp_path, "x.png")])


def test_layout_auto_refuses_layout_flags_and_runs_the_plans_pick(comm, capsys):
    with pytest.raises(MpitrainError, match="leave out --tp"):
        plan_config(layout="auto", tp=2)
    from mpitrain.plan.auto import choose

    config = plan_config(layout="auto", steps=1)
    chosen, line = choose(config, comm)
    ranked, _ = search(comm.size, config, WIDTHS, comm.size, profile.load_profile(None),
                       zero_stages=(0,), parameter_server=False)
    assert (chosen.tp, chosen.pp, chosen.micro_batches) == (ranked[0].spec.tp, ranked[0].spec.pp,
                                                           ranked[0].spec.micro_batches)
    assert line.startswith(f"layout auto: {ranked[0].spec.describe()}")
    assert np.isfinite(ranked[0].step_s)


@pytest.mark.parametrize("zero", [1, 2])
def test_layout_auto_under_zero_picks_among_the_halves_of_that_stage(comm, monkeypatch, zero):
    """--layout auto --zero 1|2 prices each layout at the run's stage, its reduce-scatter and
    all-gather (never rd, which has none of its own; under --zero 2 never micro-batches, which it
    refuses), and the run it sets up validates. Nodes of 2 ranks: where rd was picked before."""
    from mpitrain.plan.auto import choose

    monkeypatch.setenv("MPITRAIN_RANKS_PER_NODE", "2")
    config = plan_config(layout="auto", steps=1, zero=zero)
    chosen, line = choose(config, comm)
    ranked, _ = search(comm.size, config, WIDTHS, local_rank_and_size(comm)[1], profile.load_profile(None),
                       zero_stages=(zero,), parameter_server=False)
    assert line.startswith(f"layout auto: {ranked[0].spec.describe()}")
    assert chosen.zero == zero and chosen.allreduce != "rd"
    assert all(p.spec.algorithm != "rd" for p in ranked if p.spec.dp > 1)
    assert all(p.spec.micro_batches == 1 for p in ranked if p.spec.zero == 2)
    validate(chosen)


def test_layout_auto_is_rank_0s_choice_whatever_the_other_ranks_files_say(comm, tmp_path, monkeypatch):
    """Rank 0 reads the tuning file and searches; the other ranks' files (here unreadable) are not
    read, so no rank fails or chooses alone while the others wait in a collective."""
    from mpitrain.comm import tunefile
    from mpitrain.plan.auto import choose

    path = os.path.join(tmp_path, f"tune-{comm.rank}.json")
    with open(path, "w") as out:
        out.write("{}" if comm.rank == 0 else "not json")
    monkeypatch.setenv(tunefile.ENV_FILE, path)
    chosen, line = choose(plan_config(layout="auto", steps=1, zero=1), comm)
    assert comm.allgather((chosen.tp, chosen.pp, chosen.allreduce, line)) == [(chosen.tp, chosen.pp, chosen.allreduce,
                                                                              line)] * comm.size


def test_layout_auto_keeps_a_compressed_runs_allreduce_flag(comm):
    """--grad-dtype runs with --allreduce ring or auto only (its sum is a pairwise exchange of its
    own): the pick keeps the flag instead of setting hier or MPI, which validation would refuse."""
    from mpitrain.plan.auto import choose

    for allreduce in ("auto", "ring"):
        config = plan_config(layout="auto", steps=1, grad_dtype="float16", allreduce=allreduce)
        chosen, _ = choose(config, comm)
        assert chosen.allreduce == allreduce
        validate(chosen)


def test_layout_auto_never_picks_a_parameter_server_even_when_predicted_fastest(comm, monkeypatch):
    from mpitrain.plan import search as searching
    from mpitrain.plan.auto import choose

    real = searching.predict

    def async_fastest(spec, *args):
        p = real(spec, *args)
        if spec.kind == "ps":
            p.step_s = 1e-9
        return p

    monkeypatch.setattr(searching, "predict", async_fastest)
    chosen, line = choose(plan_config(layout="auto", steps=1), comm)
    assert chosen.sync == "allreduce" and "layout auto: dp" in line


def test_ranks_beyond_the_cores_stretch_the_step_and_the_dominant_term_is_another():
    """4 ranks on a node of 2 cores: every term of the critical path at a core per rank is stretched
    by 4 / 2, the difference is "shared cores", and the dominant term names one of the others."""
    prof = free_profile(cores_per_node=2)
    spec = Spec("grid", 4, algorithm="ring")
    crowded = predict(spec, plan_config(), WIDTHS, 4, prof)
    own_cores = predict(spec, plan_config(), WIDTHS, 4, free_profile(cores_per_node=4))
    assert crowded.terms["shared cores"] == pytest.approx(sum(v for k, v in crowded.terms.items() if k != "shared cores"))
    assert "shared cores" not in own_cores.terms
    assert crowded.dominant != "shared cores" and crowded.terms[crowded.dominant] > 0
