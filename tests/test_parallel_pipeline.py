"""Pipeline schedules, stage balancing, and a pipelined run equal to the run without a pipeline."""

import itertools

import numpy as np
import pytest

from mpitrain.errors import MpitrainError
from mpitrain.parallel.pipeline import balance_stages, bubble_fraction, message_tag, parse_stages, schedule
from parallel_runs import assert_same_run, layout_run, serial_run

SCHEDULES = ["gpipe", "1f1b"]


def simulate(kind: str, stages: int, micro_batches: int):
    """Run every stage's schedule in unit time slots: F(m) on stage s needs F(m) done on s-1, B(m)
    needs F(m) here and B(m) done on s+1. Returns (slots used, busy slots per stage, peak micro-batches
    held per stage); raises if the stages deadlock."""
    plans = [schedule(kind, stages, s, micro_batches) for s in range(stages)]
    position, done = [0] * stages, set()
    held, peak, busy, slot = [0] * stages, [0] * stages, [0] * stages, 0
    while any(position[s] < len(plans[s]) for s in range(stages)):
        ready = []
        for s in range(stages):
            if position[s] == len(plans[s]):
                continue
            action, m = plans[s][position[s]]
            needs = [("F", s - 1, m)] if action == "F" and s > 0 else []
            if action == "B":
                needs = [("F", s, m)] + ([("B", s + 1, m)] if s < stages - 1 else [])
            if all(need in done for need in needs):
                ready.append((s, action, m))
        if not ready:
            raise AssertionError(f"{kind} deadlocks at slot {slot}: positions {position}")
        for s, action, m in ready:
            done.add((action, s, m))
            position[s] += 1
            busy[s] += 1
            held[s] += 1 if action == "F" else -1
            peak[s] = max(peak[s], held[s])
        slot += 1
    return slot, busy, peak


@pytest.mark.parametrize("kind", SCHEDULES)
def test_schedules_run_every_micro_batch_once_without_deadlock(kind):
    for stages, micro in itertools.product(range(1, 5), range(1, 7)):
        for s in range(stages):
            actions = schedule(kind, stages, s, micro)
            assert sorted(actions) == sorted([("F", m) for m in range(micro)] + [("B", m) for m in range(micro)])
            assert all(actions.index(("F", m)) < actions.index(("B", m)) for m in range(micro))
        slots, busy, peak = simulate(kind, stages, micro)
        # Equal-cost forward and backward: 2M busy slots of 2(M+P-1), so idle (P-1)/(M+P-1) on every stage.
        assert slots == 2 * (micro + stages - 1)
        for s in range(stages):
            assert 1 - busy[s] / slots == pytest.approx(bubble_fraction(stages, micro))
            assert peak[s] == (micro if kind == "gpipe" else min(stages - s, micro))


def test_tags_never_collide_within_a_step():
    tags = [message_tag(direction, m) for m in range(1000) for direction in (0, 1)]
    assert len(set(tags)) == len(tags) and min(tags) >= 0 and max(tags) <= 32767


def brute_force_balance(counts, stages):
    best = None
    for cuts in itertools.combinations(range(1, len(counts)), stages - 1):
        edges = [0, *cuts, len(counts)]
        load = max(sum(counts[a:b]) for a, b in zip(edges, edges[1:]))
        best = load if best is None else min(best, load)
    return best


def test_balance_stages_minimises_the_largest_stage():
    rng = np.random.default_rng(0)
    for _ in range(50):
        counts = rng.integers(1, 100, size=rng.integers(1, 8)).tolist()
        for stages in range(1, len(counts) + 1):
            split = balance_stages(counts, stages)
            assert len(split) == stages and min(split) >= 1 and sum(split) == len(counts)
            edges = np.cumsum([0] + split)
            assert max(sum(counts[a:b]) for a, b in zip(edges, edges[1:])) == brute_force_balance(counts, stages)


def test_balance_of_the_wide_mlp_puts_the_big_layer_alone():
    counts = [784 * 4096 + 4096, 4096 * 4096 + 4096, 4096 * 10 + 10]
    assert balance_stages(counts, 2) == [1, 2]


@pytest.mark.parametrize("spec,message", [("2,x", "positive layer counts"), ("0,3", "positive layer counts"),
                                          ("1,1", "summing to the model's 3"), ("3", "expected 2 counts")])
def test_parse_stages_rejects_bad_specs(spec, message):
    with pytest.raises(MpitrainError, match=message):
        parse_stages(spec, 2, 3)
    assert parse_stages("2,1", 2, 3) == [2, 1]


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("micro_batches", [1, 5])
@pytest.mark.parametrize("layout", [(1, 1, 2), (1, 2, 2), (1, 1, 4)])
def test_pipeline_equals_no_pipeline(comm, small_classification, kind, micro_batches, layout):
    """M micro-batches (5 splits the batch of 12 unevenly) through P stages, either schedule,
    give the parameters and losses of the one-process run without a pipeline."""
    settings = dict(data=small_classification, micro_batches=micro_batches, pipeline_schedule=kind, steps=6)
    expected = serial_run(**settings)
    result = layout_run(comm, layout, **settings)
    assert_same_run(result, expected)


def test_micro_batches_without_a_pipeline_accumulate_gradients(comm, small_classification):
    settings = dict(data=small_classification, micro_batches=3, steps=4)
    assert_same_run(layout_run(comm, (1, 1, 1), **settings), serial_run(**settings))
