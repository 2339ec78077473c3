"""Draw a --trace file as a timeline image: one band per rank, one row per track, arrows for messages.

    mpirun -n 4 mpitrain train --tp 2 --pp 2 --micro-batches 4 --steps 3 --trace run.json --trace-steps 2:3
    python benchmarks/plot_trace.py run.json --out docs/trace-tp2-pp2.png

The same JSON that Perfetto (https://ui.perfetto.dev) opens; this is for a picture without a browser.
"""

import argparse
import os
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"step": "#dddddd", "data": "#8c564b", "compute": "#1f77b4", "gradient all-reduce": "#d62728",
          "tensor-parallel": "#9467bd", "pipeline": "#2ca02c", "parameter server": "#17becf",
          "optimizer": "#ff7f0e", "checkpoint": "#7f7f7f", "wait": "#bcbd22"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--out", default="trace.png")
    args = parser.parse_args()
    with open(args.trace) as handle:
        events = json.load(handle)["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    kinds = [k for k in COLORS if any(e["cat"] == k for e in spans)]
    ranks = sorted({e["pid"] for e in spans})
    row = {(rank, kind): i for i, (rank, kind) in enumerate((r, k) for r in ranks for k in kinds)}
    t0 = min(e["ts"] for e in spans)
    fig, ax = plt.subplots(figsize=(14, 0.32 * len(row) + 1.2))
    for e in spans:
        ax.barh(row[e["pid"], e["cat"]], e["dur"] / 1e3, left=(e["ts"] - t0) / 1e3, height=0.8,
                color=COLORS[e["cat"]], edgecolor="black", linewidth=0.2)
    ends = {}
    for e in events:
        if e["ph"] in ("s", "f"):
            ends.setdefault(e["id"], {})[e["ph"]] = e
    for pair in ends.values():
        if "s" in pair and "f" in pair:
            s, f = pair["s"], pair["f"]
            ax.annotate("", xy=((f["ts"] - t0) / 1e3, row[f["pid"], "pipeline" if ("pipeline" in kinds) else kinds[0]]),
                        xytext=((s["ts"] - t0) / 1e3, row[s["pid"], "pipeline" if ("pipeline" in kinds) else kinds[0]]),
                        arrowprops={"arrowstyle": "->", "color": "black", "lw": 0.6})
    ax.set_yticks(list(row.values()), [f"rank {r}: {k}" for r, k in row])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(f"{os.path.basename(args.trace)}: one step, time from its first event")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
