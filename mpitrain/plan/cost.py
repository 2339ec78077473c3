"""The cost model of one layout: bytes per rank (exact), memory per rank, and step time.

    spec = Spec("grid", dp=2, tp=2, pp=1, algorithm="ring")
    traffic, memory = usage(Spec("grid", dp=2, tp=2), config, widths, ranks_per_node=4)
    fullest_rank(rank_fields(config_spec(config, 8, widths), config, widths, ranks_per_node=4))
    prediction = timing.predict(spec, config, widths, ranks_per_node=4, profile=profile)

Bytes and memory are computed for every rank from the same rules the code follows (the tensor-group
sums of parallel/mappings.py, the stage links of parallel/pipeline.py, the gradient buckets of
comm/buckets.py, the parameter server's ranges) and reported like the metrics: the busiest rank of
each field. The memory check before a run (memory.py) takes the parts of the fullest rank of the
layout its flags describe (`config_spec`). Time per step, on the busiest stage (units: seconds):

    compute     GEMMs (2 r in out FLOPs each: forward, weight gradient, input gradient but on the
                first layer) at the profile's rate for that shape; element-wise work and the loss
                from the bytes they stream at the rank's memory bandwidth; a fixed cost per array call
    tensor      the ring sums of each column/row pair, per micro-batch (forward and backward)
    pipeline    the activation and gradient each stage receives per micro-batch
    bubble      the idle share (P-1)/(M+P-1) of the pipelined part (parallel/pipeline.py)
    data        the gradient buckets' all-reduces, minus what overlaps with the backward still to run
    optimizer   its passes over this rank's parameters (1/dp of them from ZeRO stage 1 on)
    server queue the asynchronous parameter server's wait for the server, behind other workers' gradients
    overhead    the fixed per-step cost and the per-step agreement of every rank

ZeRO stages (Rajbhandari et al., "ZeRO", SC 2020; --zero, comm/buckets.py): stage 1 keeps 1/dp of
the optimizer state per rank, stage 2 also 1/dp of the gradients (plus two staging slots); both
sum gradients as a reduce-scatter + all-gather of the run's algorithm (zero_sent: the bytes;
timing.sync_time: the time).
"""

from dataclasses import asdict, dataclass, replace

import numpy as np

from mpitrain.comm.buckets import MiB, plan_buckets, slot_elements, zero2_buckets
from mpitrain.comm.hier import TWO_LEVEL_BYTES, equal_nodes, tuned_two_level_bytes
from mpitrain.comm.compress import wire_dtype
from mpitrain.comm.ring import chunk_bounds
from mpitrain.data.sampler import local_batch_sizes
from mpitrain.nn.model import layer_roles
from mpitrain.optim import buffer_names
from mpitrain.parallel.grid import plan_layout
from mpitrain.parallel.pipeline import micro_batch_bounds, schedule
from mpitrain.plan.collectives import Group, group_of, hier_sent, mpi_sent_bytes, rd_sent, ring_sent

# Passes over the parameter buffer of one optimizer step and its array calls (optim.py: Adam's
# 12 in-place operations read and write 28 buffers' worth; SGD multiplies then subtracts).
OPTIMIZER_PASSES = {"adam": (28, 12), "sgd": (5, 2), "sgd-momentum": (9, 4)}


@dataclass(frozen=True)
class Spec:
    """One candidate: kind 'grid' (dp x tp x pp; stages: --stages as given, None to balance them by
    parameters) or 'ps' (dp workers + servers, tp = pp = 1, ps_mode 'sync' or 'async' as --ps-mode)."""

    kind: str
    dp: int
    tp: int = 1
    pp: int = 1
    micro_batches: int = 1
    schedule: str = "1f1b"
    zero: int = 0
    algorithm: str = "ring"
    servers: int = 0
    ps_mode: str = "sync"
    stages: str | None = None

    @property
    def asynchronous(self) -> bool:
        """Whether updates use stale gradients (the asynchronous parameter server), unlike the one-process run."""
        return self.kind == "ps" and self.ps_mode == "async"

    @property
    def world(self) -> int:
        return self.dp + self.servers if self.kind == "ps" else self.dp * self.tp * self.pp

    def describe(self) -> str:
        if self.kind == "ps":
            return f"ps {self.ps_mode} {self.dp} workers + {self.servers} server(s)"
        parts = [f"dp{self.dp} tp{self.tp} pp{self.pp}"]
        if self.pp > 1:
            parts.append(f"m{self.micro_batches} {self.schedule}" + (f" stages {self.stages}" if self.stages else ""))
        if self.dp > 1:
            parts.append(f"zero{self.zero} {self.algorithm}" if self.zero else self.algorithm)
        return " ".join(parts)


@dataclass
class Prediction:
    spec: Spec
    step_s: float
    samples_per_s: float
    terms: dict          # seconds per step by term (see the module docstring)
    bytes: dict          # tp/pp/dp/sent bytes per step of the busiest rank, as the metrics name them
    memory: dict         # param/grad/optimizer/activation bytes of the busiest rank, and their max sum

    @property
    def dominant(self) -> str:
        """The largest term of the step, other than "shared cores" (which, where ranks outnumber cores,
        is the same share of every layout's step and so says nothing about any one of them)."""
        terms = {name: seconds for name, seconds in self.terms.items() if name != "shared cores"}
        return max(terms, key=terms.get)

    def as_dict(self) -> dict:
        spec = asdict(self.spec)
        if self.spec.kind != "ps":
            del spec["ps_mode"]  # a grid layout has no server
        return {"layout": self.spec.describe(), **spec, "step_s": self.step_s,
                "samples_per_s": self.samples_per_s, "dominant": self.dominant, "terms": self.terms,
                "bytes": self.bytes, "memory": self.memory}


# ---------------------------------------------------------------------------- one rank's layers


def local_layers(widths: list[int], tp: int, tp_rank: int, span: tuple[int, int]) -> list[dict]:
    """This rank's dense layers [start, stop): global index, role, local (in, out), bias length."""
    roles = layer_roles(len(widths) - 1, tp)
    out = []
    for i in range(*span):
        n_in, n_out = widths[i], widths[i + 1]
        if roles[i] == "column":
            a, b = chunk_bounds(n_out, tp)[tp_rank]
            out.append({"index": i, "role": "column", "in": n_in, "out": b - a, "bias": b - a, "full_in": n_in})
        elif roles[i] == "row":
            a, b = chunk_bounds(n_in, tp)[tp_rank]
            out.append({"index": i, "role": "row", "in": b - a, "out": n_out, "bias": n_out, "full_out": n_out})
        else:
            out.append({"index": i, "role": "whole", "in": n_in, "out": n_out, "bias": n_out})
    return out


def n_params(layers: list[dict]) -> int:
    return sum(layer["in"] * layer["out"] + layer["bias"] for layer in layers)


def saved_bytes(layers: list[dict], rows: int, itemsize: int, activation: str, n_dense: int) -> int:
    """Bytes one micro-batch of `rows` keeps for backward (nn/model.py): every layer's input, each
    array once. An activation keeps its output (ReLU as its mask, tanh for its derivative), which is
    the next layer's input on the same stage: only the stage's last layer, when the model goes on
    after it, adds its output."""
    total = 0
    for layer in layers:
        total += rows * layer["in"] * itemsize
    last = layers[-1] if layers else None
    if last is not None and last["index"] < n_dense - 1:
        total += rows * last["out"] * itemsize
    return total


def peak_activation_bytes(layers, micro_rows, itemsize, activation, n_dense, kind, stages, stage) -> int:
    """Most bytes kept at once over one step's schedule on this stage (gpipe: every micro-batch;
    1f1b: at most P - s in flight)."""
    live = peak = 0
    for action, micro in schedule(kind, stages, stage, len(micro_rows)):
        change = saved_bytes(layers, micro_rows[micro], itemsize, activation, n_dense)
        live += change if action == "F" else -change
        peak = max(peak, live)
    return peak


def tensor_sums(layers: list[dict]) -> list[tuple[str, int]]:
    """(direction, columns) of each ring sum the tensor group runs per micro-batch: a row layer's
    output forward, a column layer's input gradient backward (not on the model's first layer)."""
    sums = []
    for layer in layers:
        if layer["role"] == "row":
            sums.append(("forward", layer["full_out"]))
        elif layer["role"] == "column" and layer["index"] > 0:
            sums.append(("backward", layer["full_in"]))
    return sums


# ---------------------------------------------------------------------------- bytes and memory per rank


def wire_itemsize(config) -> int | None:
    """Bytes per value of --grad-dtype where it is narrower than --dtype (the buckets are then
    summed compressed, comm/compress.py), else None."""
    if config.grad_dtype is None:
        return None
    wire = wire_dtype(config.grad_dtype).itemsize
    return wire if wire < np.dtype(config.dtype).itemsize else None


def compressed_bytes(bucket_chunks: list[list[int]], dp: int, wire: int, itemsize: int, error_feedback: bool,
                     params: int) -> int:
    """Bytes a rank holds for compressed sums (comm/compress.py: CompressedSum.nbytes): per bucket
    its rounded copy and the dp receive slots of the largest chunk in the wire dtype, and with
    error feedback the gradient plus residual in the parameters' dtype; with error feedback the
    residual of all `params` entries. bucket_chunks: each bucket's chunk lengths over the ranks."""
    held = 0
    for chunks in bucket_chunks:
        count = sum(chunks)
        held += count * wire + dp * max(max(chunks), 1) * wire + (count * itemsize if error_feedback else 0)
    return held + (params * itemsize if error_feedback else 0)


def shard_parts(shards, start: int, stop: int) -> np.ndarray:
    """Entries of the bucket [start, stop) in each rank's shard: the chunk lengths of its sum under
    --zero (comm/buckets.py: bucket_chunks)."""
    return np.array([max(0, min(b, stop) - max(a, start)) for a, b in shards])


def dp_sent(counts: list[int], itemsize: int, spec: Spec, dp_ranks, group: Group, placement, choose,
            wire: int | None = None):
    """Bytes each of dp_ranks (an array) sends summing buckets of `counts` elements over its
    data-parallel group; placement: (node index, local rank, ranks per node) within the group.
    wire: the compressed dtype's bytes per value (comm/compress.py: each rank sends every owner
    its chunk, and the owners' sums go round the ring's all-gather, both in the wire dtype)."""
    total = dp_ranks * 0
    for count in counts:
        if wire is not None:
            total = total + ring_sent(count, spec.dp, dp_ranks) * wire
            continue
        algorithm = choose(count * itemsize, group) if spec.algorithm == "auto" else spec.algorithm
        if algorithm == "ring":
            total = total + ring_sent(count, spec.dp, dp_ranks) * itemsize
        elif algorithm == "rd":
            total = total + rd_sent(count, spec.dp, dp_ranks) * itemsize
        elif algorithm == "hier":
            total = total + hier_sent(count, itemsize, *placement) * itemsize
        else:
            total = total + mpi_sent_bytes(count * itemsize, spec.dp)
    return total


def zero_sent(buckets, shards, itemsize: int, spec: Spec, dp_ranks, group: Group, placement, choose,
              wire: int | None = None):
    """Bytes each of dp_ranks sends under --zero: per bucket, the reduce-scatter onto the shards'
    owners and the parameters' all-gather, with each rank's chunk the bucket's part of its shard
    (comm/allreduce.py: the ring's or MPI's reduce-scatter sends all but one's own chunk, the
    all-gather all but the next rank's; rd sums the whole bucket instead; hier sends nothing on
    one node, and across nodes sums the whole bucket and rings the all-gather). wire: compressed
    (comm/compress.py), the reduce-scatter sends every owner its chunk in the wire dtype whatever
    the algorithm, and the all-gather stays in the parameters' dtype."""
    total = dp_ranks * 0
    if spec.dp == 1:
        return total
    for start, stop, _ in buckets:
        count = stop - start
        chunks = shard_parts(shards, start, stop)
        algorithm = choose(count * itemsize, group, sharded=True) if spec.algorithm == "auto" else spec.algorithm
        if wire is not None:
            reduce = (count - chunks[dp_ranks]) * wire
        elif algorithm == "rd":
            reduce = rd_sent(count, spec.dp, dp_ranks) * itemsize
        elif algorithm == "hier":
            reduce = hier_sent(count, itemsize, *placement) * itemsize
        else:
            reduce = (count - chunks[dp_ranks]) * itemsize
        gather = count - chunks[(dp_ranks + 1) % spec.dp]
        if algorithm == "hier" and len(placement[2]) == 1:
            gather = gather * 0  # the shared-memory all-gather of one node
        total = total + reduce + gather * itemsize
    return total


class AutoChooser:
    """What --allreduce auto picks for n bytes over a group (sharded: for --zero's reduce-scatter and
    all-gather, comm/thresholds.py), and from which buffer size `hier`
    crosses nodes from every local rank there: what `mpitrain tune` saved for that many ranks and
    nodes, else the built-in defaults. Each layout's entry is read once, however many layouts
    a plan prices. tuned=False: the built-in defaults alone, reading no file, for counts that do
    not depend on the algorithm (memory), which every rank of a run makes."""

    def __init__(self, tuned: bool = True):
        self.tuned = tuned
        self.tables, self.crossovers = {}, {}

    def __call__(self, nbytes: int, group: Group, sharded: bool = False) -> str:
        from mpitrain.comm.thresholds import Thresholds, default_table, load_table

        key = (group.size, group.nodes, sharded)
        if key not in self.tables:
            self.tables[key] = Thresholds((load_table if self.tuned else default_table)(*key))
        return self.tables[key](nbytes)

    def two_level_bytes(self, size: int, nodes: int) -> int | None:
        if (size, nodes) not in self.crossovers:
            self.crossovers[size, nodes] = tuned_two_level_bytes(size, nodes) if self.tuned else TWO_LEVEL_BYTES
        return self.crossovers[size, nodes]


def auto_chooser() -> AutoChooser:
    return AutoChooser()


def grid_ranks(spec: Spec, config, widths: list[int], ranks_per_node: int, choose):
    """Yield (stage, tp_rank, layers, micro_rows of data-parallel rank 0, {field: bytes}) for every
    (stage, tensor rank) of a grid, each field an array over the data-parallel ranks; choose: an
    AutoChooser."""
    layout = plan_layout(replace(config, tp=spec.tp, pp=spec.pp, micro_batches=spec.micro_batches,
                                 pipeline_schedule=spec.schedule, stages=spec.stages), spec.world, widths)
    itemsize = np.dtype(config.dtype).itemsize
    batches = np.array(local_batch_sizes(config.batch_size, spec.dp))
    dp_ranks = np.arange(spec.dp)
    n_dense = len(widths) - 1
    for stage, span in enumerate(layout.stages):
        for tp_rank in range(spec.tp):
            layers = local_layers(widths, spec.tp, tp_rank, span)
            slices = np.cumsum([0] + [layer["in"] * layer["out"] + layer["bias"] for layer in layers]).tolist()
            buckets = plan_buckets(list(zip(slices[:-1], slices[1:])), itemsize, config.bucket_mb)
            params = n_params(layers)
            shards = chunk_bounds(params, spec.dp)  # ZeRO: each rank's equal block of the stage's parameters
            staged = None  # --zero 2 (comm/buckets.py): the buckets it sums, and its slots when it stages
            if spec.zero >= 2:
                buckets, stage_them = zero2_buckets(buckets, list(zip(slices[:-1], slices[1:])),
                                                    [layer["out"] for layer in layers],
                                                    int(config.bucket_mb * MiB) // itemsize, shards, params)
                staged = slot_elements([stop - start for start, stop, _ in buckets]) if stage_them else None
            members = (stage * spec.dp + dp_ranks) * spec.tp + tp_rank
            group = group_of(members.tolist(), ranks_per_node)
            nodes = members // ranks_per_node
            first = np.r_[True, nodes[1:] != nodes[:-1]]  # members are in node order
            node_index = np.cumsum(first) - 1
            starts = np.flatnonzero(first)
            local_rank = dp_ranks - starts[node_index]
            node_sizes = np.diff(np.r_[starts, spec.dp]).tolist()
            # hier's crossover to every local rank, as the run will read it from a tuning file
            crossover = choose.two_level_bytes(spec.dp, len(node_sizes)) if equal_nodes(node_sizes) else None
            placement = (node_index, local_rank, node_sizes, crossover)
            # A field that depends on the rows is computed once per distinct local batch size.
            per_batch = {}
            for rows in set(batches.tolist()):
                micro_rows = [b - a for a, b in micro_batch_bounds(rows, spec.micro_batches)]
                per_batch[rows] = (
                    sum(ring_sent(r * columns, spec.tp, tp_rank) for r in micro_rows
                        for _, columns in tensor_sums(layers)) * itemsize,
                    peak_activation_bytes(layers, micro_rows, itemsize, config.activation, n_dense,
                                          spec.schedule, spec.pp, stage))
            pp_bytes = batches * 0
            if stage < spec.pp - 1:
                pp_bytes = pp_bytes + batches * layers[-1]["out"] * itemsize
            if stage > 0:
                pp_bytes = pp_bytes + batches * layers[0]["in"] * itemsize
            shard = np.array([stop - start for start, stop in shards])
            wire = wire_itemsize(config) if spec.dp > 1 else None
            held = 0  # --grad-dtype's buffers (the same on every rank of the group)
            if wire is not None:
                chunk_lengths = [shard_parts(shards, start, stop) if spec.zero else
                                 [b - a for a, b in chunk_bounds(stop - start, spec.dp)] for start, stop, _ in buckets]
                held = compressed_bytes(chunk_lengths, spec.dp, wire, itemsize, config.error_feedback, params)
            fields = {
                "param": np.full(spec.dp, params * itemsize),
                "grad": (staged + shard if staged is not None else np.full(spec.dp, params)) * itemsize + held,
                "optimizer": len(buffer_names(config)) * (shard if spec.zero >= 1 else np.full(spec.dp, params)) * itemsize,
                "activation": np.array([per_batch[rows][1] for rows in batches.tolist()]),
                "tp": np.array([per_batch[rows][0] for rows in batches.tolist()]),
                "pp": pp_bytes,
                "dp": (zero_sent(buckets, shards, itemsize, spec, dp_ranks, group, placement, choose, wire) if spec.zero
                       else dp_sent([stop - start for start, stop, _ in buckets], itemsize, spec, dp_ranks, group,
                                    placement, choose, wire))}
            micro_rows = [b - a for a, b in micro_batch_bounds(int(batches[0]), spec.micro_batches)]
            yield stage, tp_rank, layers, micro_rows, fields


def ps_ranks(spec: Spec, config, widths: list[int]):
    """Yield {field: bytes} of every worker and server of a parameter-server layout (ps_train.py).
    Bytes are the same in both modes: per global step a worker sends one gradient (in async mode that
    is the mean over workers, W gradients per step) and a server answers W of them. A server's
    gradients are its sum plus, in sync mode, the slots it receives into (ps.py's serve_by_step):
    W at --staleness 0, exactly what a run allocates; (K + 1) x W at --staleness K, the bound, which a
    run reaches only when workers do run K steps apart. Async mode receives into the sum itself."""
    itemsize = np.dtype(config.dtype).itemsize
    slots = 0 if spec.ps_mode == "async" else (config.staleness + 1) * spec.dp
    layers = local_layers(widths, 1, 0, (0, len(widths) - 1))
    params = n_params(layers)
    for rows in local_batch_sizes(config.batch_size, spec.dp):
        # A worker keeps the whole model and its gradient and sends all of the gradient each step.
        yield {"param": params * itemsize, "grad": params * itemsize, "optimizer": 0,
               "activation": saved_bytes(layers, rows, itemsize, config.activation, len(widths) - 1),
               "tp": 0, "pp": 0, "dp": params * itemsize}
    for a, b in chunk_bounds(params, spec.servers):
        yield {"param": (b - a) * itemsize, "grad": (1 + slots) * (b - a) * itemsize,
               "optimizer": len(buffer_names(config)) * (b - a) * itemsize, "activation": 0,
               "tp": 0, "pp": 0, "dp": spec.dp * (b - a) * itemsize}


MEMORY_FIELDS = ("param", "grad", "optimizer", "activation")


def fullest_rank(per_rank: list[dict]) -> dict:
    """{param, grad, optimizer, activation} bytes of the rank that holds the most in all (per_rank:
    {field: bytes} of every rank, a field's value one rank's number or an array over ranks)."""
    fullest, most = None, -1
    for fields in per_rank:
        parts = [np.ravel(part) for part in np.broadcast_arrays(*(fields[name] for name in MEMORY_FIELDS))]
        totals = sum(parts)
        rank = int(np.argmax(totals))
        if totals[rank] > most:
            fullest, most = {name: int(part[rank]) for name, part in zip(MEMORY_FIELDS, parts)}, totals[rank]
    return fullest


def busiest(per_rank: list[dict]) -> tuple[dict, dict]:
    """(bytes, memory) as the metrics report them: each field's maximum over ranks, the total sent
    the maximum of each rank's sum; memory also the largest per-rank total (the fullest rank's).
    A field's value may be one rank's number or an array over ranks."""
    def top(values) -> int:
        return int(max(np.max(value) for value in values))

    traffic = {"tp_bytes_per_step": top(r["tp"] for r in per_rank), "pp_bytes_per_step": top(r["pp"] for r in per_rank),
               "dp_bytes_per_step": top(r["dp"] for r in per_rank),
               "sent_bytes_per_step": top(np.add(np.add(r["tp"], r["pp"]), r["dp"]) for r in per_rank)}
    memory = {f"{name}_bytes_per_rank": top(r[name] for r in per_rank) for name in MEMORY_FIELDS}
    memory["total_bytes_per_rank"] = sum(fullest_rank(per_rank).values())
    return traffic, memory


def rank_fields(spec: Spec, config, widths: list[int], ranks_per_node: int, choose=None) -> list[dict]:
    """{field: bytes} of every rank of a layout (a grid's values are arrays over its data-parallel
    ranks), fields as in `busiest`; MpitrainError (from plan_layout) when a grid layout does not fit."""
    if spec.kind == "ps":
        return list(ps_ranks(spec, config, widths))
    return [fields for *_, fields in grid_ranks(spec, config, widths, ranks_per_node, choose or auto_chooser())]


def usage(spec: Spec, config, widths: list[int], ranks_per_node: int, choose=None) -> tuple[dict, dict]:
    """(bytes sent per step, memory) of the busiest rank of a layout, in the metrics' field names
    (see `busiest`); MpitrainError (from plan_layout) when a grid layout does not fit."""
    return busiest(rank_fields(spec, config, widths, ranks_per_node, choose))


def config_spec(config, world: int, widths: list[int]) -> Spec:
    """The Spec of the layout a run's flags describe on `world` ranks; MpitrainError (from
    plan_layout) when a grid layout does not fit. For a parameter server, check_config (ps.py)
    has made sure there is a worker and a server."""
    if config.sync == "ps":
        return Spec("ps", world - config.servers, servers=config.servers, ps_mode=config.ps_mode)
    layout = plan_layout(config, world, widths)
    return Spec("grid", layout.dp, layout.tp, layout.pp, layout.micro_batches, layout.schedule, config.zero,
                config.allreduce, stages=config.stages)
