"""`mpitrain trace-summary FILE.json`: where each rank's time went, and what the slowest rank waited on.

    mpitrain trace-summary run.json
    mpitrain trace-summary run.json --top 20

Per rank: seconds per track (kind of work) of the traced steps, the share of the traced wall time,
and the bytes sent. Then the critical path's top items: the slowest rank's steps bound the run
(the others wait for it in the next collective), so its longest spans, grouped by name, are what
to make faster first.
"""

import json
from collections import defaultdict

from mpitrain.errors import MpitrainError


def load(path: str) -> list[dict]:
    """The events of a Trace Event Format file (object with traceEvents, or a bare list)."""
    try:
        with open(path) as handle:
            data = json.load(handle)
    except OSError as exc:
        raise MpitrainError(f"trace-summary {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise MpitrainError(f"trace-summary {path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise MpitrainError(f"trace-summary {path}: no traceEvents list: not a Trace Event Format file")
    return events


def summarize(events: list[dict], top: int = 10) -> dict:
    """{"ranks": {pid: {"wall_s", "bytes", "by_kind": {kind: s}}}, "slowest": pid, "top": [(name, s, count)]}."""
    spans = [e for e in events if e.get("ph") == "X"]
    if not spans:
        raise MpitrainError("trace-summary: the trace holds no spans (was --trace-steps outside the run?)")
    ranks: dict = {}
    for pid in sorted({e["pid"] for e in spans}):
        mine = [e for e in spans if e["pid"] == pid]
        by_kind = defaultdict(float)
        for e in mine:
            by_kind[e.get("cat", "?")] += e["dur"] / 1e6
        steps = [e for e in mine if e.get("cat") == "step"]
        wall = sum(e["dur"] for e in steps) / 1e6 if steps else (
            max(e["ts"] + e["dur"] for e in mine) - min(e["ts"] for e in mine)) / 1e6
        ranks[pid] = {"wall_s": wall, "bytes": sum(int(e.get("args", {}).get("bytes") or 0) for e in mine),
                      "by_kind": dict(by_kind)}
    slowest = max(ranks, key=lambda pid: ranks[pid]["wall_s"])
    grouped = defaultdict(lambda: [0.0, 0])
    for e in spans:
        if e["pid"] == slowest and e.get("cat") != "step":
            entry = grouped[f"{e.get('cat', '?')}: {e['name']}"]
            entry[0] += e["dur"] / 1e6
            entry[1] += 1
    items = sorted(((name, s, n) for name, (s, n) in grouped.items()), key=lambda item: -item[1])[:top]
    return {"ranks": ranks, "slowest": slowest, "top": items}


def render(summary: dict) -> str:
    lines = []
    kinds = sorted({kind for rank in summary["ranks"].values() for kind in rank["by_kind"]})
    lines.append(f"{'rank':>4} {'wall s':>8} {'sent MB':>8}  " + "  ".join(f"{kind:>12}" for kind in kinds))
    for pid, rank in summary["ranks"].items():
        cells = "  ".join(f"{rank['by_kind'].get(kind, 0.0):>12.4f}" for kind in kinds)
        lines.append(f"{pid:>4} {rank['wall_s']:>8.4f} {rank['bytes'] / 1e6:>8.3f}  {cells}")
    wall = summary["ranks"][summary["slowest"]]["wall_s"]
    lines.append(f"critical path: rank {summary['slowest']} (slowest, {wall:.4f} s); its top items:")
    for name, seconds, count in summary["top"]:
        share = 100 * seconds / wall if wall > 0 else 0.0
        lines.append(f"  {seconds:>9.4f} s {share:>5.1f} %  x{count:<5} {name}")
    return "\n".join(lines)


def run(path: str, top: int = 10) -> str:
    return render(summarize(load(path), top))
