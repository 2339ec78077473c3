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
