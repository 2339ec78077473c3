"""The plan's bytes and memory per rank equal what a run's metrics report for the same layout.

Each layout trains a tiny model (uneven widths, so slices and chunks differ by rank) for two steps
on the first ranks of the test's communicator, in this process; the plan computes the same fields
from the config alone, and every one must match exactly. The memory check before a run
(memory.py) counts the plan's fullest rank of the layout its flags describe, so its parts are
within the metrics' field by field.
"""

import json
import os

import numpy as np
import pytest

from groups import groups_of
from mpitrain.comm import local_rank_and_size, tunefile
from mpitrain.memory import model_bytes
from mpitrain.nn.model import parse_widths
from mpitrain.parallel.grid import dense_param_counts
from mpitrain.plan.cost import Spec, usage
from mpitrain.train import train
from parallel_runs import config

FIELDS = ("tp_bytes_per_step", "pp_bytes_per_step", "dp_bytes_per_step", "sent_bytes_per_step",
          "param_bytes_per_rank", "grad_bytes_per_rank", "optimizer_bytes_per_rank", "activation_bytes_per_rank")

# world size: [(spec, config overrides)]: every grid axis, micro-batching under both schedules,
# each hand-written all-reduce and MPI's, the parameter server in both modes (at --staleness 0,
# where a sync server's W gradient slots are exact), and ZeRO stages 1 and 2 (buckets of 1e-4 MiB, so --zero 2 cuts every layer into pieces of rows).
LAYOUTS = {
    1: [(Spec("grid", 1), {})],
    2: [(Spec("grid", 2, algorithm="ring"), {"allreduce": "ring"}),
        (Spec("grid", 2, algorithm="mpi"), {"allreduce": "mpi", "optimizer": "sgd", "momentum": 0.5}),
        (Spec("grid", 1, tp=2), {"tp": 2}),
        (Spec("grid", 1, pp=2, micro_batches=3, schedule="gpipe"),
         {"pp": 2, "micro_batches": 3, "pipeline_schedule": "gpipe"}),
        (Spec("grid", 1, pp=2, micro_batches=2, stages="3,1"), {"pp": 2, "micro_batches": 2, "stages": "3,1"}),
        (Spec("ps", 1, servers=1), {"sync": "ps"}),
        (Spec("ps", 1, servers=1, ps_mode="async"), {"sync": "ps", "ps_mode": "async"}),
        (Spec("grid", 2, zero=1, algorithm="ring"), {"zero": 1, "allreduce": "ring", "bucket_mb": 1e-4}),
        (Spec("grid", 2, zero=2, algorithm="mpi"), {"zero": 2, "allreduce": "mpi", "bucket_mb": 1e-4})],
    4: [(Spec("grid", 1, tp=2, pp=2, micro_batches=2), {"tp": 2, "pp": 2, "micro_batches": 2}),
        (Spec("grid", 2, tp=2, algorithm="rd"), {"tp": 2, "allreduce": "rd", "activation": "tanh"}),
        (Spec("grid", 2, pp=2, micro_batches=2, algorithm="hier"), {"pp": 2, "micro_batches": 2, "allreduce": "hier"}),
        (Spec("grid", 4, algorithm="auto", zero=0), {"batch_size": 14}),
        (Spec("ps", 2, servers=2), {"sync": "ps", "servers": 2}),
        (Spec("ps", 3, servers=1, ps_mode="async"), {"sync": "ps", "ps_mode": "async"}),
        (Spec("grid", 4, zero=2, algorithm="auto"), {"zero": 2, "bucket_mb": 1e-4, "batch_size": 16}),
        (Spec("grid", 2, tp=2, zero=2, algorithm="hier"), {"tp": 2, "zero": 2, "allreduce": "hier", "bucket_mb": 1e-4}),
        (Spec("grid", 2, pp=2, micro_batches=2, zero=1, algorithm="rd"),
         {"pp": 2, "micro_batches": 2, "zero": 1, "allreduce": "rd", "bucket_mb": 1e-4}),
        # Cutting layers into pieces would need larger slots here than the buckets as planned:
        # --zero 2 stages the planned buckets (64-5-1-33-8, buckets of 300 values).
        (Spec("grid", 4, zero=2, algorithm="ring"),
         {"model": "64-5-1-33-8", "zero": 2, "allreduce": "ring", "bucket_mb": 300 * 8 / (1 << 20)})],
}


@pytest.mark.parametrize("size", sorted(LAYOUTS))
def test_predicted_bytes_and_memory_equal_the_metrics(comm, size):
    compare(comm, size, LAYOUTS[size])


# --grad-dtype narrower than --dtype: the buckets' pairwise exchange in the wire dtype, the all-gather
# of --zero 0 in it too and of --zero 1, 2 in the parameters' dtype; its buffers in grad_bytes_per_rank.
COMPRESSED = {
    2: [(Spec("grid", 2, algorithm="ring"), {"allreduce": "ring", "grad_dtype": "float16"}),
        (Spec("grid", 2, zero=1, algorithm="auto"), {"zero": 1, "grad_dtype": "float16", "error_feedback": True,
                                                     "bucket_mb": 1e-4})],
    4: [(Spec("grid", 2, tp=2, algorithm="auto"), {"tp": 2, "grad_dtype": "float16", "error_feedback": True}),
        (Spec("grid", 4, zero=2, algorithm="ring"), {"zero": 2, "allreduce": "ring", "grad_dtype": "float16",
                                                     "bucket_mb": 1e-4, "batch_size": 16}),
        (Spec("grid", 2, pp=2, micro_batches=2, zero=1, algorithm="auto"),
         {"pp": 2, "micro_batches": 2, "zero": 1, "grad_dtype": "float16", "bucket_mb": 1e-4})],
}


@pytest.mark.parametrize("size", sorted(COMPRESSED))
def test_compressed_bytes_and_memory_equal_the_metrics(comm, size):
    compare(comm, size, COMPRESSED[size])


@pytest.mark.parametrize("size", [2, 4])
def test_a_stale_synchronous_server_is_planned_at_its_bound(comm, size):
    """At --staleness K a server holds as many gradient slots as its workers ran apart: the plan gives
    the bound, the sum and (K + 1) x W slots, and a run's count lies between lock-step's W and it;
    every other field is exact."""
    staleness, workers = 2, size - 1
    with groups_of(comm, size) as group:
        if group is None:
            return
        run_config = config(steps=4, sync="ps", staleness=staleness)
        record = train(run_config, group).history[-1]
        widths = parse_widths(run_config.model)
        traffic, memory = usage(Spec("ps", workers, servers=1), run_config, widths, size)
        predicted = {**traffic, **memory}
        # One server holds all of θ: its gradients are the busiest rank's.
        share = sum(dense_param_counts(widths)) * np.dtype(run_config.dtype).itemsize
        assert predicted["grad_bytes_per_rank"] == (1 + (staleness + 1) * workers) * share
        assert (1 + workers) * share <= record["grad_bytes_per_rank"] <= predicted["grad_bytes_per_rank"]
        for field in FIELDS:
            if field != "grad_bytes_per_rank":
                assert predicted[field] == record[field], field


@pytest.mark.parametrize("per_node", [2, 3])
def test_hierarchical_bytes_across_emulated_nodes(comm, monkeypatch, per_node):
    """Nodes of 2 and 2 ranks: every local rank rings its chunk across the nodes; of 3 and 1: the
    nodes' first ranks ring the whole buffer."""
    monkeypatch.setenv("MPITRAIN_RANKS_PER_NODE", str(per_node))
    compare(comm, 4, [(Spec("grid", 4, algorithm="hier"), {"allreduce": "hier", "batch_size": 16})], per_node)


@pytest.mark.parametrize("zero", [0, 1])
def test_a_grid_group_spans_the_emulated_nodes_of_its_world_ranks(comm, monkeypatch, zero):
    """dp 2 x tp 2 on emulated nodes of 2 ranks: each data-parallel group ({0, 2} and {1, 3}) has a
    rank on each node, so hier's sum (and under --zero its all-gather) crosses them; the run's
    bytes equal the plan's for 2 ranks per node, which are not zero."""
    monkeypatch.setenv("MPITRAIN_RANKS_PER_NODE", "2")
    layout = [(Spec("grid", 2, tp=2, zero=zero, algorithm="hier"), {"tp": 2, "zero": zero, "allreduce": "hier"})]
    compare(comm, 4, layout, 2)
    if comm.size >= 4:
        traffic, _ = usage(layout[0][0], config(**layout[0][1]), parse_widths(config().model), 2)
        assert traffic["dp_bytes_per_step"] > 0


def test_hierarchical_bytes_follow_a_tuned_crossover(comm, monkeypatch, shared_dir):
    """A tuning file that makes hier cross nodes from every local rank at every size (the model's
    buckets are far below the built-in 1 MiB): the run and the plan both read it."""
    monkeypatch.setenv("MPITRAIN_RANKS_PER_NODE", "2")
    path = os.path.join(shared_dir, "tune.json")
    if comm.rank == 0:
        with open(path, "w") as out:
            json.dump({"format": tunefile.FORMAT, "layouts": {tunefile.layout_key(4, 2): {
                "thresholds": [[None, "hier"]], "hier_two_level_bytes": 0}}}, out)
    comm.Barrier()
    monkeypatch.setenv(tunefile.ENV_FILE, path)
    compare(comm, 4, [(Spec("grid", 4, algorithm="hier"), {"allreduce": "hier", "batch_size": 16})], 2)


@pytest.mark.parametrize("size", [2, 4])
def test_zero_buckets_follow_the_sharded_thresholds(comm, monkeypatch, shared_dir, size):
    """A tuning file whose all-reduce table says mpi and whose sharded table says hier: --zero 0 sends
    MPI's bytes, --zero 1 and 2 send none (hier's halves on one node), and the plan reads the same
    table for each (the halves are priced from the sharded one, not the all-reduce's)."""
    if os.environ.get("MPITRAIN_RANKS_PER_NODE"):
        pytest.skip("one node: hier's halves send nothing there, and the file names a one-node layout")
    path = os.path.join(shared_dir, "tune.json")
    if comm.rank == 0:
        with open(path, "w") as out:
            json.dump({"format": tunefile.FORMAT, "layouts": {tunefile.layout_key(size, 1): {
                "thresholds": [[None, "mpi"]], "sharded_thresholds": [[None, "hier"]]}}}, out)
    comm.Barrier()
    monkeypatch.setenv(tunefile.ENV_FILE, path)
    compare(comm, size, [(Spec("grid", size, algorithm="auto"), {}),
                         (Spec("grid", size, zero=1, algorithm="auto"), {"zero": 1}),
                         (Spec("grid", size, zero=2, algorithm="auto"), {"zero": 2, "bucket_mb": 1e-4})])
    with groups_of(comm, size) as group:
        if group is not None:
            sent = [train(config(steps=2, zero=zero), group).history[-1]["dp_bytes_per_step"] for zero in (0, 1)]
            assert sent[0] > 0 and sent[1] == 0


def compare(comm, size, layouts, ranks_on_node=None):
    """Train each (spec, overrides) on `size` ranks of comm and compare the plan's fields with the
    last record's; ranks_on_node: the plan's ranks per node (default: this node's)."""
    with groups_of(comm, size) as group:
        if group is None:
            return
        ranks_on_node = ranks_on_node or local_rank_and_size(group)[1]
        for spec, overrides in layouts:
            run_config = config(steps=2, **overrides)
            record = train(run_config, group).history[-1]
            widths = parse_widths(run_config.model)
            traffic, memory = usage(spec, run_config, widths, ranks_on_node)
            predicted = {**traffic, **memory}
            for field in FIELDS:
                assert predicted[field] == record[field], (spec.describe(), field)
            parts = model_bytes(run_config, widths, size)
            assert sum(parts.values()) == memory["total_bytes_per_rank"], spec.describe()
            for part, field in zip(parts.values(), FIELDS[4:]):
                assert part <= record[field], (spec.describe(), field)
