"""plan --calibrate's overlap efficiency: the share of the overlappable gradient-sum seconds that
--overlap hides, measured by training with and without it."""

import pytest

from mpitrain.plan import profile
from mpitrain.plan.calibrate import hidden_share, overlap_efficiency


def test_the_hidden_share_is_the_saving_over_what_could_be_hidden():
    assert hidden_share(0.9, 1.0, 0.2) == pytest.approx(0.5)
    assert hidden_share(0.8, 1.0, 0.2) == pytest.approx(1.0)
    # noise either way stays a share
    assert hidden_share(0.7, 1.0, 0.2) == 1.0
    assert hidden_share(1.1, 1.0, 0.2) == 0.0


def slow_link_profile() -> dict:
    """A profile whose link makes the gradient sum most of a data-parallel step, so that the plan's
    buckets could hide a large share of it and the measurement runs."""
    slow = profile.builtin()
    slow["links"] = {"intra": {"alpha_s": 1e-4, "beta_s_per_byte": 1e-8}}
    return profile.check(slow, "test")


def test_overlap_efficiency_is_a_share_every_rank_agrees_on(comm):
    # six 2 MiB layers, a bucket each: every bucket but the first layer's could hide behind the
    # backward of the layers before it (the plan says 16 % of the step at 2 ranks)
    widths = [512] * 6
    share = overlap_efficiency(comm, widths, 256, "float64", slow_link_profile(), rounds=2, seconds=0.05,
                               allreduce="ring")
    assert 0.0 <= share <= 1.0
    assert comm.allgather(share) == [share] * comm.size
    if comm.size == 1:
        assert share == 0.0  # nothing to sum


def test_overlap_efficiency_is_zero_where_the_buckets_hide_almost_nothing(comm):
    # the built-in profile's fast link: a 16-8-2 model's one bucket is not worth measuring
    assert overlap_efficiency(comm, [16, 8, 2], 8, "float64", profile.builtin()) == 0.0


def test_scaled_rates_predict_the_measured_one_rank_step_exactly():
    import dataclasses

    from mpitrain.config import TrainConfig, validate
    from mpitrain.plan.calibrate import scale_to_step
    from mpitrain.plan.timing import Machine, update_time, whole_model_compute

    widths = [64, 256, 128, 10]
    config = validate(dataclasses.replace(TrainConfig(), model="64-256-128-10", batch_size=32, device="cpu"))
    base = profile.builtin()
    base["gemm"] = [{"dtype": "float32", "m": 32, "k": 64, "n": 256, "flops_per_s": 4e10, "threads": 1},
                    {"dtype": "float32", "m": 32, "k": 64, "n": 256, "flops_per_s": 7e10, "threads": 2}]
    base = profile.check(base, "test")
    alone, together = (3e-3, 2e-3), (5e-3, 4e-3)  # (forward and backward, update), seconds
    scaled = scale_to_step(base, config, widths, 2, alone, together)
    count = 64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    for ranks, (compute, update) in ((1, alone), (2, together)):
        machine = Machine(scaled, ranks, "float32")
        assert whole_model_compute(machine, widths, 32, 4) == pytest.approx(compute, rel=1e-9)
        assert update_time(machine, config, count, count, 4) == pytest.approx(update, rel=1e-9)
    assert scaled["stream_alone_factor"] == pytest.approx(2.0, rel=0.05)  # the update alone: half the time
    assert "rates scaled to a step's" in scaled["source"]


def test_a_rank_alone_streams_faster_by_the_profiles_factor():
    from mpitrain.plan.timing import Machine

    fast = profile.check({**profile.builtin(), "stream_alone_factor": 1.5}, "test")
    working = fast["stream"][0]["bytes"]
    assert Machine(fast, 1, "float32").bandwidth_at(working) == pytest.approx(1.5 * fast["stream"][0]["bytes_per_s"])
    assert Machine(fast, 2, "float32").bandwidth_at(working) == pytest.approx(fast["stream"][0]["bytes_per_s"])
    with pytest.raises(Exception, match="stream_alone_factor"):
        profile.check({**profile.builtin(), "stream_alone_factor": 0}, "test")


def test_a_calibration_over_an_earlier_profile_keeps_its_step_scaled_rates(monkeypatch):
    """The profile --calibrate writes over an earlier one holds the new rates as scaled to a step,
    not the tight-loop ones it measured first (the merge took the raw list)."""
    from mpi4py import MPI

    from mpitrain.plan import calibrate as cal

    def fake_gemm(comm, widths, batch, dtype, share, cores):
        return [{"dtype": dtype, "m": 8, "k": 8, "n": 8, "threads": 1, "flops_per_s": 1e9}]

    def halved(comm, widths, batch, dtype, profile):
        return {**profile, "gemm": [{**e, "flops_per_s": e["flops_per_s"] / 2} for e in profile["gemm"]]}

    monkeypatch.setattr(cal, "measure_gemm", fake_gemm)
    monkeypatch.setattr(cal, "stream_rate", lambda working: 1e10)
    monkeypatch.setattr(cal, "step_overhead", lambda comm, dtype: 1e-3)
    monkeypatch.setattr(cal, "step_scaled", halved)
    monkeypatch.setattr(cal, "overlap_efficiency", lambda *args: 0.0)
    earlier = profile.builtin()
    earlier["gemm"] = [{"dtype": "float32", "m": 64, "k": 64, "n": 64, "threads": 1, "flops_per_s": 3e9},
                       {"dtype": "float32", "m": 8, "k": 8, "n": 8, "threads": 1, "flops_per_s": 7e9}]
    for previous in (None, profile.check(earlier, "test")):
        made = cal.calibrate(MPI.COMM_SELF, [8, 8, 2], 8, "float32", previous)
        rates = {(e["m"], e["k"], e["n"]): e["flops_per_s"] for e in made["gemm"]}
        assert rates[8, 8, 8] == 0.5e9  # this calibration's shape: measured, then scaled
        if previous is not None:
            assert rates[64, 64, 64] == 3e9  # the earlier profile's other shape: kept as it was


def test_one_rank_per_node_names_the_factor_its_rates_got():
    import dataclasses

    from mpitrain.config import TrainConfig, validate
    from mpitrain.plan.calibrate import scale_to_step
    from mpitrain.plan.timing import Machine, update_time, whole_model_compute

    widths = [16, 32, 4]
    config = validate(dataclasses.replace(TrainConfig(), model="16-32-4", batch_size=32, device="cpu"))
    base = profile.builtin()
    predicted = whole_model_compute(Machine(base, 1, "float32"), widths, 32, 4)
    count = 16 * 32 + 32 + 32 * 4 + 4
    update = update_time(Machine(base, 1, "float32"), config, count, count, 4)  # the stream rates stay
    scaled = scale_to_step(base, config, widths, 1, (10 * predicted, update), (10 * predicted, update))
    threads = base["cores_per_node"]
    ratio = base["gemm_flops_per_s"]["float32"] / scaled["gemm_flops_per_s"]["float32"]
    assert f"{threads} thread(s) /{ratio:.2f}" in scaled["source"]
    assert whole_model_compute(Machine(scaled, 1, "float32"), widths, 32, 4) == pytest.approx(10 * predicted)


def test_a_calibration_times_each_algorithms_all_reduce_and_its_zero_pair(comm, monkeypatch):
    """On several ranks the profile gets two curves per algorithm: the all-reduce's (every
    candidate) and --zero's reduce-scatter + all-gather pair's (ring, hier, mpi: rd has none), and
    over an earlier profile it keeps the curves of other kinds and groups."""
    if comm.size == 1:
        pytest.skip("collective curves are measured on two ranks or more")
    from mpitrain.plan import calibrate as cal

    def fake_measure(comm, sizes, algorithms, trials=3, sharded=False):
        return {name: [(2e-3 if sharded else 1e-3)] * len(sizes) for name in algorithms}

    monkeypatch.setattr(cal, "measure", fake_measure)
    monkeypatch.setattr(cal, "measure_gemm", lambda comm, widths, batch, dtype, share, cores: [
        {"dtype": dtype, "m": 8, "k": 8, "n": 8, "threads": 1, "flops_per_s": 1e9}])
    monkeypatch.setattr(cal, "stream_rate", lambda working: 1e10)
    monkeypatch.setattr(cal, "step_overhead", lambda comm, dtype: 1e-3)
    monkeypatch.setattr(cal, "step_scaled", lambda comm, widths, batch, dtype, profile: profile)
    monkeypatch.setattr(cal, "overlap_efficiency", lambda *args: 0.0)
    earlier = profile.builtin()
    earlier["collectives"] = [{"algorithm": "ring", "ranks": 64, "nodes": 8, "bytes": [1], "seconds": [1.0],
                               "kind": "halves"}]
    made = cal.calibrate(comm, [8, 8, 2], 8, "float32", profile.check(earlier, "test"))
    curves = {(c["algorithm"], c["kind"], c["ranks"]): c["seconds"][0] for c in made["collectives"]}
    assert curves == {**{(name, "allreduce", comm.size): 1e-3 for name in ("mpi", "rd", "hier", "ring")},
                      **{(name, "halves", comm.size): 2e-3 for name in ("mpi", "hier", "ring")},
                      ("ring", "halves", 64): 1.0}
