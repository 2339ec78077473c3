"""What `mpitrain plan` prints: a ranked table per world size, the pick and why, the infeasible
layouts with their reasons; the same as JSON; and a plot of samples/s and parallel efficiency.

Parallel efficiency at P ranks = samples/s / (P x samples/s of the best one-rank layout), when one
rank is among the planned sizes (else against the smallest planned size, scaled).
"""


from mpitrain.errors import MpitrainError
from mpitrain.memory import describe
from mpitrain.outputs import atomic_write
from mpitrain.plan.search import explain


def _mb(nbytes: float) -> str:
    return f"{nbytes / (1 << 20):.1f}"


def table(args, profile: dict, per_node: int, results: dict) -> str:
    lines = [f"mpitrain plan: --model {args.model} --batch-size {args.batch_size} {args.dtype} {args.optimizer}; "
             f"{per_node} rank(s) per node; profile: {profile['name'] or '(unnamed)'} ({profile['source']})"]
    for world, (ranked, infeasible) in results.items():
        lines.append("")
        lines.append(f"== {world} rank(s): {len(ranked)} feasible, {len(infeasible)} infeasible")
        if ranked:
            lines.append(f"  {'#':>3} {'layout':<34} {'ms/step':>9} {'samples/s':>10} {'mem/rank':>10} "
                         f"{'MiB sent/step':>14}  dominant")
            for i, p in enumerate(ranked[:args.top], 1):
                lines.append(f"  {i:>3} {p.spec.describe():<34} {p.step_s * 1e3:>9.2f} {p.samples_per_s:>10.0f} "
                             f"{describe(p.memory['total_bytes_per_rank']):>10} "
                             f"{_mb(p.bytes['sent_bytes_per_step']):>14}  {p.dominant}")
        lines.append("  " + explain(ranked))
        reasons: dict[str, list[str]] = {}
        for entry in infeasible:
            reasons.setdefault(entry.reason, []).append(entry.spec.describe())
        for reason, layouts in list(reasons.items())[:args.top]:
            more = f" (+{len(layouts) - 1} more)" if len(layouts) > 1 else ""
            lines.append(f"  infeasible: {layouts[0]}{more}: {reason}")
        if len(reasons) > args.top:
            lines.append(f"  ... {len(reasons) - args.top} more reasons (--json lists all)")
    return "\n".join(lines)


def as_json(args, profile: dict, per_node: int, results: dict) -> dict:
    return {"model": args.model, "batch_size": args.batch_size, "dtype": args.dtype, "optimizer": args.optimizer,
            "ranks_per_node": per_node, "profile": {"name": profile["name"], "source": profile["source"]},
            "worlds": {str(world): {"pick": ranked[0].as_dict() if ranked else None, "why": explain(ranked),
                                    "ranked": [p.as_dict() for p in ranked],
                                    "infeasible": [entry.as_dict() for entry in infeasible]}
                       for world, (ranked, infeasible) in results.items()}}


def check_plot(path: str) -> None:
    """Fail before any work when matplotlib is missing or the file cannot be written."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise MpitrainError("--plot needs matplotlib, from the 'plot' extra: pip install 'mpitrain[plot]'")
    from mpitrain.outputs import check_file

    check_file(path)


def plot(results: dict, path: str, model: str, best: int = 4) -> None:
    """Samples/s and parallel efficiency against ranks for the `best` layout shapes of the largest world."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted(results)
    shapes = []
    for p in results[worlds[-1]][0]:
        shape = _shape(p.spec)
        if shape not in shapes:
            shapes.append(shape)
    shapes = shapes[:best] or ["best"]
    base_world = worlds[0]
    base = results[base_world][0][0].samples_per_s / base_world if results[base_world][0] else None
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for shape in ["best"] + [s for s in shapes if s != "best"]:
        xs, ys = [], []
        for world in worlds:
            ranked = results[world][0]
            match = ranked[:1] if shape == "best" else [p for p in ranked if _shape(p.spec) == shape][:1]
            if match:
                xs.append(world)
                ys.append(match[0].samples_per_s)
        if xs:
            left.plot(xs, ys, marker="o", label=shape)
            if base:
                right.plot(xs, [y / (x * base) for x, y in zip(xs, ys)], marker="o", label=shape)
    for axis, label in ((left, "predicted samples/s"), (right, "parallel efficiency")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("ranks")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    left.set_yscale("log")
    left.legend(fontsize=8)
    figure.suptitle(f"mpitrain plan: {model}")
    figure.tight_layout()
    try:
        atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=110), binary=True)
    finally:
        plt.close(figure)


def _shape(spec) -> str:
    """A layout family that exists at several world sizes: which axes are used, not their sizes."""
    if spec.kind == "ps":
        return f"parameter server {spec.ps_mode}"
    used = [axis for axis, size in (("dp", spec.dp), ("tp", spec.tp), ("pp", spec.pp)) if size > 1] or ["one rank"]
    return " x ".join(used) + (f" zero{spec.zero}" if spec.zero else "")
