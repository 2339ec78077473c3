"""The timeline trace (mpitrain/trace.py): a run's file is Trace Event Format with every rank, its
message bytes add up to the metrics' byte counts, sends pair with receives, spans nest; the step
window holds; trace-summary reads it; off, it costs nothing measurable."""

import contextlib
import dataclasses
import io
import json
import os
import timeit
from collections import Counter, defaultdict

import pytest

from mpitrain import trace_summary
from mpitrain.cli import run
from mpitrain.config import TrainConfig, validate
from mpitrain.errors import MpitrainError
from mpitrain.trace import KINDS, TRACE, parse_steps
from mpitrain.train import train

STEPS = 4
# layout -> (world sizes it fits, config overrides)
LAYOUTS = {
    "dp": (lambda size: True, {}),
    "tp": (lambda size: size % 2 == 0, {"tp": 2}),
    "pp": (lambda size: size % 2 == 0, {"pp": 2, "micro_batches": 2}),
    "tp-pp": (lambda size: size % 4 == 0, {"tp": 2, "pp": 2, "micro_batches": 2}),
    "ps": (lambda size: size >= 2, {"sync": "ps"}),
    "zero1": (lambda size: size >= 2, {"zero": 1}),
    "zero2": (lambda size: size >= 2, {"zero": 2, "bucket_mb": 1e-4}),
}
BYTES_OF_KIND = {"gradient all-reduce": "dp_bytes_per_step", "tensor-parallel": "tp_bytes_per_step",
                 "pipeline": "pp_bytes_per_step"}


def traced_run(comm, data: str, folder: str, layout: str, **extra) -> tuple[dict, list[dict]]:
    fits, overrides = LAYOUTS[layout]
    if not fits(comm.size):
        pytest.skip(f"layout {layout} does not fit a world of {comm.size}")
    path = os.path.join(folder, f"{layout}.json")
    config = validate(dataclasses.replace(TrainConfig(), model="12-16-16-3", batch_size=24, steps=STEPS, data=data,
                                          device="cpu", progress=False, val_fraction=0.1, trace=path,
                                          **{**overrides, **extra}))
    result = train(config, comm)
    with open(path) as handle:
        document = json.load(handle)
    return result.history[0], document["traceEvents"]


def assert_spans_nest(spans: list[dict]) -> None:
    """On every (rank, track), two spans are disjoint or one holds the other (1 ns rounding allowed)."""
    tracks = defaultdict(list)
    for span in spans:
        tracks[span["pid"], span["tid"]].append(span)
    for key, track in tracks.items():
        stack = []
        for span in sorted(track, key=lambda s: (s["ts"], -s["dur"])):
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= span["ts"] + 1e-3:
                stack.pop()
            if stack:
                assert span["ts"] + span["dur"] <= stack[-1]["ts"] + stack[-1]["dur"] + 1e-3, (key, stack[-1], span)
            stack.append(span)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_trace_is_complete_and_adds_up_to_the_metrics(comm, small_classification, shared_dir, layout):
    record, events = traced_run(comm, small_classification, shared_dir, layout)
    spans = [e for e in events if e["ph"] == "X"]
    assert all(e["dur"] >= 0 and {"ts", "pid", "tid", "name"} <= set(e) for e in spans)
    named = {e["pid"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert named == {e["pid"] for e in spans} == set(range(comm.size))
    sends = Counter(e["id"] for e in events if e["ph"] == "s")
    receives = Counter(e["id"] for e in events if e["ph"] == "f")
    assert sends == receives
    if layout in ("pp", "tp-pp", "ps"):
        assert sends, "point-to-point messages need arrows"
    assert_spans_nest(spans)
    if layout == "ps":
        return
    if layout.startswith("zero"):
        # The parameters' all-gather has a track of its own; it runs from the update into the next
        # step's forward, so its bytes do not add up per step as the others' do.
        gathered = [e for e in spans if e["cat"] == "parameter all-gather"]
        sent = Counter()
        for e in gathered:
            sent[e["pid"]] += e["args"]["bytes"]
        assert set(sent) == set(range(comm.size)) and min(sent.values()) > 0, sent
        return
    assert {e["args"]["step"] for e in spans if e["cat"] == "step"} == set(range(STEPS))
    for kind, metric in BYTES_OF_KIND.items():
        per_rank = Counter()
        for e in spans:
            if e["cat"] == kind and e["args"]["step"] is not None:
                per_rank[e["pid"]] += e["args"]["bytes"]
        assert int(max(per_rank.values(), default=0) / STEPS) == record[metric], (kind, per_rank, record[metric])


def test_trace_steps_limit_the_events(comm, small_classification, shared_dir):
    _, events = traced_run(comm, small_classification, shared_dir, "dp", trace_steps="1:3")
    assert {e["args"]["step"] for e in events if e["ph"] == "X"} == {1, 2}


def test_trace_steps_are_checked():
    for spec in ("3", "3:3", "a:4", "-1:2"):
        with pytest.raises(MpitrainError, match="--trace-steps"):
            parse_steps(spec)
    assert parse_steps("2:5") == (2, 5)


def test_trace_summary_shows_every_rank_and_the_critical_path(comm, small_classification, shared_dir):
    _, events = traced_run(comm, small_classification, shared_dir, "dp")
    text = trace_summary.run(os.path.join(shared_dir, "dp.json"), top=3)
    lines = text.splitlines()
    for rank in range(comm.size):
        assert any(line.split()[0] == str(rank) for line in lines[1:comm.size + 1]), text
    assert "critical path: rank" in text and len(lines) == 1 + comm.size + 1 + 3, text
    # The command prints the same table and returns, without starting a training run.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run(["trace-summary", os.path.join(shared_dir, "dp.json"), "--top", "3"])
    assert out.getvalue().strip() == (text if comm.rank == 0 else "")


def test_trace_off_costs_nothing_measurable(comm, small_classification, shared_dir):
    """Off, each event a traced step records costs at most two `TRACE.active` tests: on the busiest
    rank, compared with the same run's shortest step, that stays under 0.5 %, far below what a
    step-loop benchmark can resolve (its run-to-run spread is several per cent here)."""
    _, events = traced_run(comm, small_classification, shared_dir, "dp")
    steps = [e for e in events if e["ph"] == "X" and e["cat"] == "step"]
    per_rank = Counter(e["pid"] for e in events if e["ph"] in ("s", "f") or
                       (e["ph"] == "X" and e["args"]["step"] is not None))
    per_step = max(per_rank.values()) / STEPS
    assert not TRACE.active
    check_s = min(timeit.repeat("TRACE.active", globals={"TRACE": TRACE}, number=100_000, repeat=5)) / 100_000
    step_s = min(e["dur"] for e in steps) / 1e6
    assert 2 * per_step * check_s < 5e-3 * step_s, (per_step, check_s, step_s)


def test_every_track_is_named(comm, small_classification, shared_dir):
    _, events = traced_run(comm, small_classification, shared_dir, "dp")
    names = {(e["pid"], e["args"]["name"]) for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {(rank, kind) for rank in range(comm.size) for kind in KINDS}
