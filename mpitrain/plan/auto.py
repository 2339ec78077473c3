"""`mpitrain train --layout auto`: the layout the plan picks for this job's world size. Collective.

Rank 0 reads the profile (--profile, else the calibrated default, else the built-in one) and the
all-reduce tuning file, searches (plan/search.py) and broadcasts the choice, so every rank runs
the same layout even where the ranks' files differ.

The choice is among grid layouts at the run's own --zero stage, the ones the flags it sets
describe: under --zero 1 or 2 the algorithm is priced and picked for the reduce-scatter and
all-gather pair (never rd, which has no reduce-scatter of its own). Never a parameter server:
those are a split of the ranks into roles that a run asks for (--sync ps), and the asynchronous
one applies stale gradients, a different optimization from the one-process run, which no
automatic choice may switch a run to because it happens to be predicted faster.
"""

import dataclasses

from mpi4py import MPI

from mpitrain.comm import agree, local_rank_and_size
from mpitrain.errors import MpitrainError
from mpitrain.nn.model import parse_widths
from mpitrain.plan.cost import wire_itemsize
from mpitrain.plan.profile import load_profile
from mpitrain.plan.search import ALGORITHMS, search


def choose(config, comm: MPI.Intracomm):
    """(config with tp, pp, micro_batches, pipeline_schedule and allreduce set by the plan, a line
    saying what was chosen and why). Collective on comm; MpitrainError on every rank when rank 0
    cannot read the profile or the tuning file, or no layout fits."""
    _, ranks_on_node = local_rank_and_size(comm)  # collective: on every rank
    result, error = None, None
    if comm.rank == 0:
        try:
            result = _search(config, comm.size, ranks_on_node)
        except MpitrainError as exc:
            error = exc
    agree(comm, error)
    fields, line = comm.bcast(result, root=0)
    return dataclasses.replace(config, **fields), line


def _search(config, world: int, ranks_on_node: int) -> tuple[dict, str]:
    """({flag: value} the plan's pick sets, the line saying what it chose and why) for `world` ranks."""
    widths = parse_widths(config.model)
    profile = load_profile(config.profile)
    # A compressed sum (--grad-dtype, comm/compress.py) is its own exchange whatever the algorithm,
    # and it runs with --allreduce ring or auto only: the search prices the ring and the flag stays.
    compressed = wire_itemsize(config) is not None
    algorithms = ("ring",) if compressed else ALGORITHMS if config.allreduce == "auto" else (config.allreduce,)
    ranked, infeasible = search(world, config, widths, ranks_on_node, profile, zero_stages=(config.zero,),
                                algorithms=algorithms, parameter_server=False)
    if not ranked:
        reasons = "; ".join(sorted({entry.reason for entry in infeasible}))
        raise MpitrainError(f"--layout auto: no layout of {world} rank(s) fits --model {config.model}: {reasons}")
    best = ranked[0]
    spec = best.spec
    fields = {"tp": spec.tp, "pp": spec.pp, "micro_batches": spec.micro_batches, "pipeline_schedule": spec.schedule,
              "allreduce": spec.algorithm if spec.dp > 1 and not compressed else config.allreduce}
    line = (f"layout auto: {spec.describe()} ({world} rank(s), {ranks_on_node} per node; predicted "
            f"{best.step_s * 1e3:.3g} ms/step, {best.samples_per_s:.0f} samples/s, dominant term {best.dominant}; "
            f"profile {profile['name'] or profile['source']})")
    return fields, line
