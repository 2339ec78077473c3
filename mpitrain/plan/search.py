"""Every layout of a world size, why the infeasible ones do not fit, and the ranking of the rest.

    ranked, infeasible = search(64, config, widths, ranks_per_node=4, profile=profile)
    ranked[0]                     # the pick: the shortest predicted step
    explain(ranked)               # the pick and why: its dominant term, and the runner-up

A grid layout is dp x tp x pp with tp and pp dividing the world, micro-batches (pipelines only),
the pipeline schedule (it changes memory, not time), the ZeRO stage and the all-reduce algorithm
(data-parallel groups only); a parameter-server layout is W workers and S servers, synchronous or
asynchronous (--ps-mode). Tensor groups stay within a node: they exchange activations twice per
layer pair and micro-batch, the most frequent messages of any layout.

Every layout but the asynchronous parameter server computes the one-process run's updates (to
rounding); async applies each gradient to parameters some W - 1 updates newer than those it was
computed on (more for a slow worker), a different optimization, so `explain` says so when it is
the fastest and names the fastest synchronous layout, and `train --layout auto` (plan/auto.py)
never picks it.
"""

from dataclasses import dataclass, replace

from mpitrain.config import zero_problem
from mpitrain.errors import MpitrainError
from mpitrain.nn.model import layer_roles
from mpitrain.parallel.grid import plan_layout
from mpitrain.plan.cost import Spec, auto_chooser
from mpitrain.plan.timing import predict

ALGORITHMS = ("ring", "rd", "hier", "mpi")
ZERO_STAGES = (0, 1, 2)
MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
SCHEDULES = ("1f1b", "gpipe")


@dataclass
class Infeasible:
    spec: Spec
    reason: str

    def as_dict(self) -> dict:
        return {"layout": self.spec.describe(), "world": self.spec.world, "reason": self.reason}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(world: int, n_dense: int, ranks_per_node: int, zero_stages=ZERO_STAGES, algorithms=ALGORITHMS,
               parameter_server: bool = True) -> list[Spec]:
    """Every layout of `world` ranks the search considers (feasible or not)."""
    specs = []
    for tp in divisors(world):
        if tp > max(1, ranks_per_node):
            continue
        for pp in divisors(world // tp):
            if pp > n_dense:
                continue
            dp = world // (tp * pp)
            pipes = [(m, s) for m in MICRO_BATCHES for s in SCHEDULES] if pp > 1 else [(1, "1f1b")]
            for micro, schedule in pipes:
                for zero in (zero_stages if dp > 1 else (0,)):
                    # Under ZeRO, rd would sum whole buckets and then ring the all-gather: never
                    # better than the ring's own halves, so it is not listed.
                    sharded = tuple(a for a in algorithms if a != "rd") or ("ring",)
                    for algorithm in (("ring",) if dp == 1 else sharded if zero else algorithms):
                        specs.append(Spec("grid", dp, tp, pp, micro, schedule, zero, algorithm))
    if parameter_server and world > 1:
        servers = 1
        while servers <= world // 2:
            specs += [Spec("ps", world - servers, servers=servers, ps_mode=mode) for mode in ("sync", "async")]
            servers *= 2
    return specs


def width_problem(spec: Spec, widths: list[int]) -> str | None:
    """A tensor group wider than a sliced width would leave some ranks an empty slice."""
    if spec.tp == 1:
        return None
    roles = layer_roles(len(widths) - 1, spec.tp)
    sliced = [widths[i + 1] if role == "column" else widths[i] for i, role in enumerate(roles) if role != "whole"]
    if not sliced:
        return f"--tp {spec.tp}: the model has no layer pair to slice"
    if min(sliced) < spec.tp:
        return f"--tp {spec.tp} exceeds the width {min(sliced)} of a sliced layer (a rank would hold an empty slice)"
    return None


def search(world: int, config, widths: list[int], ranks_per_node: int, profile: dict, memory_limit: int | None = None,
           **choices) -> tuple[list, list[Infeasible]]:
    """(feasible Predictions, fastest first; Infeasible layouts with their reasons) for `world` ranks.
    choices: zero_stages, algorithms, parameter_server (see candidates)."""
    from mpitrain.memory import describe

    ranked, infeasible, choose = [], [], auto_chooser()
    for spec in candidates(world, len(widths) - 1, ranks_per_node, **choices):
        # A layout of one data-parallel rank is listed at stage 0 (its shard is the whole), but a run
        # of it keeps config's --zero, and that stage's limits.
        reason = width_problem(spec, widths) or (zero_problem(max(spec.zero, config.zero), spec.micro_batches)
                                                 if spec.kind == "grid" else None)
        if reason is None:
            try:
                if spec.kind == "grid":
                    plan_layout(replace(config, tp=spec.tp, pp=spec.pp, micro_batches=spec.micro_batches,
                                        stages=None), world, widths)
                elif config.batch_size < spec.dp:
                    raise MpitrainError(f"--batch-size {config.batch_size} is smaller than the {spec.dp} workers")
            except MpitrainError as error:
                reason = str(error)
        if reason is None:
            prediction = predict(spec, config, widths, ranks_per_node, profile, choose)
            need = prediction.memory["total_bytes_per_rank"]
            if memory_limit is not None and need > memory_limit:
                reason = f"needs {describe(need)} per rank, over --memory-per-rank {describe(memory_limit)}"
            else:
                ranked.append(prediction)
        if reason is not None:
            infeasible.append(Infeasible(spec, reason))
    ranked.sort(key=lambda p: (p.step_s, p.memory["total_bytes_per_rank"]))  # ties: the smaller memory
    return ranked, infeasible


def explain(ranked: list) -> str:
    """One line: the pick, its dominant term and share of the step, and how far behind the next
    layout of another shape is; when the pick is the asynchronous parameter server, also the
    fastest synchronous layout."""
    if not ranked:
        return "no layout fits"
    best = ranked[0]
    share = best.terms[best.dominant] / best.step_s
    line = (f"pick {best.spec.describe()}: {best.step_s * 1e3:.3g} ms/step, {best.samples_per_s:.4g} samples/s; "
            f"dominant term {best.dominant} ({share:.0%} of the step)")
    shape = (best.spec.kind, best.spec.dp, best.spec.tp, best.spec.pp)
    other = next((p for p in ranked[1:] if (p.spec.kind, p.spec.dp, p.spec.tp, p.spec.pp) != shape), None)
    if other is not None:
        line += (f"; the best other shape, {other.spec.describe()}, is {other.step_s / best.step_s:.2f}x slower "
                 f"(its {other.dominant}: {other.terms[other.dominant] / other.step_s:.0%})")
    if best.spec.asynchronous:
        line += "; async applies stale gradients, not the one-process run's updates"
        synchronous = next((p for p in ranked if not p.spec.asynchronous), None)
        if synchronous is not None:
            line += (f": the fastest synchronous layout, {synchronous.spec.describe()}, is "
                     f"{synchronous.step_s / best.step_s:.2f}x slower")
    return line

