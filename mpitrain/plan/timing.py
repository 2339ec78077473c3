"""Step time of one layout on a machine profile (the terms are listed in plan/cost.py).

    prediction = predict(Spec("grid", dp=2, tp=2), config, widths, ranks_per_node=4, profile=profile)

One rank's machine is its share of a node (`Machine`): BLAS threads = cores // ranks on the node;
where ranks outnumber cores, `predict` stretches the critical path at a whole core per rank by
ranks / cores (see there). The
busiest stage sets the pace of a pipeline; its first rank (the most rows and the largest slices)
stands for the stage.
"""

import math
from dataclasses import dataclass

import numpy as np

from mpitrain.comm.buckets import plan_buckets
from mpitrain.data.sampler import local_batch_sizes
from mpitrain.optim import buffer_names
from mpitrain.plan.collectives import allreduce_time, group_of, interpolate, measured, p2p_time
from mpitrain.plan.cost import (OPTIMIZER_PASSES, Prediction, Spec, auto_chooser, busiest, grid_ranks,
                                local_layers, n_params, tensor_sums, usage)


@dataclass
class Machine:
    """What one rank of a node gets of the profile's machine, for at most as many ranks as the node
    has cores (predict stretches the step where there are more): BLAS threads, GEMM rate lookup
    and memory bandwidth."""

    profile: dict
    ranks_on_node: int
    dtype: str

    def __post_init__(self):
        cores = self.profile["cores_per_node"]
        self.threads = max(1, cores // self.ranks_on_node)
        self.bandwidth = min(self.profile["memory_bandwidth_per_core"],
                             self.profile["memory_bandwidth_per_node"] / min(self.ranks_on_node, cores))
        # Shapes measured with this rank's thread count, else the one-thread (per core) ones, scaled.
        shapes = [e for e in self.profile["gemm"] if e["dtype"] == self.dtype]
        own = [e for e in shapes if e.get("threads", 1) == self.threads]
        self.shapes, self.scale = (own, 1) if own else ([e for e in shapes if e.get("threads", 1) == 1], self.threads)
        rates = self.profile["gemm_flops_per_s"]
        self.default_rate = rates.get(self.dtype) or min(rates.values())

    def gemm(self, m: int, k: int, n: int) -> float:
        """Seconds of an (m, k) x (k, n) product: 2 m k n FLOPs at the nearest measured shape's rate."""
        if m * k * n == 0:
            return self.call()
        rate = self.default_rate * self.threads
        if self.shapes:
            def distance(e):
                return abs(math.log(e["m"] / m)) + abs(math.log(e["k"] / k)) + abs(math.log(e["n"] / n))
            rate = min(self.shapes, key=distance)["flops_per_s"] * self.scale
        return 2 * m * k * n / rate + self.call()

    def bandwidth_at(self, working: float) -> float:
        """Bytes/s of element-wise work on a working set of `working` bytes: the measured entry of
        the nearest size where the profile has a `stream` table (times stream_alone_factor for a
        rank alone on its node), else the per-core/per-node rates."""
        table = self.profile["stream"]
        if not table or working <= 0:
            return self.bandwidth
        nearest = min(table, key=lambda e: abs(math.log(e["bytes"] / working)))
        alone = self.profile["stream_alone_factor"] if self.ranks_on_node == 1 else 1.0
        return nearest["bytes_per_s"] * alone

    def stream(self, nbytes: float, calls: int = 1, working: float | None = None) -> float:
        """Seconds of element-wise work that streams nbytes through memory in `calls` array calls,
        touching `working` bytes of distinct arrays (default nbytes)."""
        return nbytes / self.bandwidth_at(nbytes if working is None else working) + calls * self.call()

    def call(self) -> float:
        return self.profile["op_overhead_s"]


def layer_times(machine: Machine, layer: dict, rows: int, itemsize: int, last_layer: bool, accumulate: bool):
    """(forward, backward) compute seconds of one local layer on `rows` rows."""
    out = rows * layer["out"] * itemsize
    forward = machine.gemm(rows, layer["in"], layer["out"]) + machine.stream(2 * out)
    backward = machine.gemm(layer["in"], rows, layer["out"]) + machine.stream(out)
    if not last_layer:  # activation forward (max, mask) and backward (product with the mask)
        forward += machine.stream(2 * out + out + rows * layer["out"], 2)
        backward += machine.stream(3 * out + rows * layer["out"])
    if layer["index"] > 0:
        backward += machine.gemm(rows, layer["out"], layer["in"])
    if accumulate:
        backward += machine.stream(3 * (layer["in"] * layer["out"] + layer["bias"]) * itemsize, 3)
    return forward, backward


def whole_model_compute(machine: Machine, widths: list[int], rows: int, itemsize: int) -> float:
    """Seconds of one forward and backward of the whole model on `rows` rows on one rank: every
    layer's products and element-wise work, and the loss (a parameter-server worker's compute,
    and the one-rank step --calibrate measures to scale the rates to a step's)."""
    n_dense = len(widths) - 1
    layers = local_layers(widths, 1, 0, (0, n_dense))
    return (sum(sum(layer_times(machine, layer, rows, itemsize, layer["index"] == n_dense - 1, False))
                for layer in layers) + machine.stream(6 * rows * widths[-1] * itemsize, 8))


def optimizer_time(machine: Machine, config, count: int, itemsize: int) -> float:
    key = config.optimizer if config.optimizer == "adam" or not config.momentum else "sgd-momentum"
    passes, calls = OPTIMIZER_PASSES[key]
    # The working set: parameters, gradients, the state buffers and a scratch buffer.
    working = (3 + len(buffer_names(config))) * count * itemsize
    return machine.stream(passes * count * itemsize, calls, working)


def update_time(machine: Machine, config, count: int, checked: int, itemsize: int) -> float:
    """Seconds of a rank's update of `count` parameters, with the step's NaN/Inf check before it
    (backend.step_finite: one dot product over the `checked` entries of the summed gradient
    this rank reads, 1/dp of it)."""
    return optimizer_time(machine, config, count, itemsize) + machine.stream(checked * itemsize)


def stage_time(machine, profile, spec, layers, micro_rows, itemsize, n_dense, tp_group, pp_same_node,
               first_stage, last_stage):
    """(compute, tensor, pipeline, per-layer backward seconds of the last micro-batch) of one stage."""
    compute = tensor = pipeline = 0.0
    last_backward = []
    for micro, rows in enumerate(micro_rows):
        backward_layers = []
        for layer in layers:
            forward, backward = layer_times(machine, layer, rows, itemsize, layer["index"] == n_dense - 1, micro > 0)
            compute += forward + backward
            backward_layers.append(backward)
        for direction, columns in tensor_sums(layers):
            seconds = allreduce_time(profile, "ring", rows * columns * itemsize, tp_group,
                                     machine.bandwidth_at(rows * columns * itemsize))
            tensor += seconds
        if last_stage:  # softmax cross-entropy or squared error: a few passes over the output
            compute += machine.stream(6 * rows * layers[-1]["out"] * itemsize, 8)
        else:
            pipeline += p2p_time(profile, rows * layers[-1]["out"] * itemsize, pp_same_node)
        if not first_stage:
            pipeline += p2p_time(profile, rows * layers[0]["in"] * itemsize, pp_same_node)
        last_backward = backward_layers
    return compute, tensor, pipeline, last_backward


def sync_time(profile: dict, algorithm: str, zero: int, nbytes: int, group, bandwidth: float) -> float:
    """Seconds to sum one bucket of nbytes over the data-parallel group: its all-reduce; under ZeRO
    its reduce-scatter and the parameters' all-gather (comm/allreduce.py): the profile's measured
    curve of that pair where it has one for this group (`mpitrain plan --calibrate` times them);
    else priced as the algorithm's all-reduce (the ring's and MPI's two halves, hier's passes
    through shared memory on one node), and where the algorithm sums the whole bucket first (rd,
    hier across nodes) that all-reduce and the ring's all-gather half after it."""
    if zero and group.size > 1 and nbytes:
        curve = measured(profile, algorithm, group, "halves")
        if curve is not None:
            return interpolate(curve["bytes"], curve["seconds"], nbytes)
    seconds = allreduce_time(profile, algorithm, nbytes, group, bandwidth)
    if zero and (algorithm == "rd" or (algorithm == "hier" and group.nodes > 1)):
        seconds += allreduce_time(profile, "ring", nbytes, group, bandwidth) / 2
    return seconds


def exposed_sync(bucket_seconds: list[float], bucket_layers: list[int], backward: list[float], efficiency: float):
    """Seconds the gradient sum adds after backward. Buckets run one after another, each from the
    moment backward finishes its layers; the share `efficiency` of the overlap with the backward
    still to run is realised (comm/buckets.py progresses them only between layers)."""
    total = sum(bucket_seconds)
    finish, clock = sum(backward), 0.0
    done_at = {}
    for index in reversed(range(len(backward))):
        clock += backward[index]
        done_at[index] = clock
    end = 0.0
    for seconds, layer in zip(bucket_seconds, bucket_layers):
        end = max(end, done_at[layer]) + seconds
    overlapped = max(0.0, end - finish)
    return efficiency * overlapped + (1 - efficiency) * total


def predict(spec: Spec, config, widths: list[int], ranks_per_node: int, profile: dict, choose=None) -> Prediction:
    """The Prediction of one layout; MpitrainError (from plan_layout) when it does not fit.

    Where ranks outnumber a node's cores, every rank stays runnable all step long, computing or
    waiting (MPICH waits for a message by polling, not asleep), so the node's cores are
    time-shared evenly: the critical path at a whole core per rank stretches by ranks / cores, the
    difference being the term "shared cores". (Measured here, 4 ranks on 2 cores: the older model,
    in which a waiting rank gave its core away, predicted pipelines and the parameter server at
    0.33-0.56x their measured step.)"""
    choose = choose or auto_chooser()
    cores, ranks_on_node = profile["cores_per_node"], min(ranks_per_node, spec.world)
    machine = Machine(profile, min(ranks_on_node, cores), config.dtype)
    estimate = _predict_ps if spec.kind == "ps" else _predict_grid
    terms, traffic, memory = estimate(spec, config, widths, ranks_per_node, profile, machine, choose)
    if ranks_on_node > cores:
        terms["shared cores"] = (ranks_on_node / cores - 1) * sum(terms.values())
    step = sum(terms.values())
    return Prediction(spec, step, config.batch_size / step if step > 0 else math.inf, terms, traffic, memory)


def _predict_grid(spec, config, widths, ranks_per_node, profile, machine, choose):
    """(terms of the busiest stage, traffic, memory) of a grid layout."""
    itemsize = np.dtype(config.dtype).itemsize
    n_dense = len(widths) - 1
    per_rank, worst, stage_busy = [], None, {}
    for stage, tp_rank, layers, micro_rows, fields in grid_ranks(spec, config, widths, ranks_per_node, choose):
        per_rank.append(fields)
        if tp_rank != 0:
            continue  # time: the first rank of each stage (the most rows, the largest slices)
        base = stage * spec.dp * spec.tp
        tp_group = group_of(list(range(base, base + spec.tp)), ranks_per_node)
        dp_members = [(stage * spec.dp + d) * spec.tp for d in range(spec.dp)]
        dp_group = group_of(dp_members, ranks_per_node)
        neighbour = base + spec.dp * spec.tp
        same_node = spec.pp == 1 or base // ranks_per_node == min(neighbour, spec.world - 1) // ranks_per_node
        compute, tensor, pipeline, backward = stage_time(machine, profile, spec, layers, micro_rows, itemsize,
                                                         n_dense, tp_group, same_node, stage == 0,
                                                         stage == spec.pp - 1)
        slices = np.cumsum([0] + [layer["in"] * layer["out"] + layer["bias"] for layer in layers]).tolist()
        buckets = plan_buckets(list(zip(slices[:-1], slices[1:])), itemsize, config.bucket_mb)
        seconds = []
        for start, stop, _ in buckets:
            nbytes = (stop - start) * itemsize
            algorithm = spec.algorithm if spec.algorithm != "auto" else choose(nbytes, dp_group, sharded=spec.zero > 0)
            seconds.append(sync_time(profile, algorithm, spec.zero, nbytes, dp_group, machine.bandwidth_at(nbytes)))
        efficiency = profile["overlap_efficiency"] if config.overlap else 0.0
        data = exposed_sync(seconds, [first for _, _, first in buckets], backward, efficiency)
        block = -(-n_params(layers) // spec.dp)  # this rank's 1/dp of the stage: its shard under ZeRO
        count = block if spec.zero else n_params(layers)
        stage_terms = {"compute": compute, "tensor": tensor, "pipeline": pipeline, "data": data,
                       "optimizer": update_time(machine, config, count, block, itemsize)}
        busy = compute + tensor + pipeline
        stage_busy[stage] = max(busy, stage_busy.get(stage, 0.0))
        if worst is None or busy > worst[0]:
            worst = (busy, stage, stage_terms)
    _, slowest, terms = worst
    terms["bubble"] = pipeline_bubble(stage_busy, slowest, spec.micro_batches)
    terms["overhead"] = _overhead(profile, machine, spec.world, ranks_per_node)
    traffic, memory = busiest(per_rank)
    return terms, traffic, memory


def pipeline_bubble(stage_busy: dict[int, float], slowest: int, micro_batches: int) -> float:
    """Seconds the slowest stage waits per step: for the first micro-batch's forward through the
    stages before it and the last one's backward through those after it, one micro-batch of each
    other stage (stage_busy: each stage's busy seconds for all M micro-batches). With P equal stages
    that is (P-1)/M of the busy time, the bubble (P-1)/(M+P-1) of the step (GPipe, Huang et al.
    2019; the same for 1F1B, Narayanan et al. 2021); with unequal stages it is what the slow stage
    really waits, which the equal-stage fraction overstated 4x for 784-4096-4096-10 on 2 stages."""
    return sum(busy for stage, busy in stage_busy.items() if stage != slowest) / micro_batches


def _overhead(profile, machine, world, ranks_per_node) -> float:
    """The fixed per-step cost and the agreement of every rank on the step's flags (an MPI all-reduce)."""
    world_group = group_of(list(range(world)), ranks_per_node)
    agreement = allreduce_time(profile, "mpi", 16, world_group, machine.bandwidth)
    return profile["step_overhead_s"] + agreement


def _predict_ps(spec, config, widths, ranks_per_node, profile, machine, choose):
    """Parameter server (parallel/ps.py): a worker computes the gradient of its rows, sends each of
    the S servers its range and waits for that range of θ back; a server's share is 1/S of θ.

    sync: every server takes the W gradients of its range one message at a time, sums them, steps
    once and answers each worker, so the step is a worker's compute, then the server's work.

    async: a server applies each gradient on arrival (an optimizer step per gradient, no sum) and
    answers at once, so the workers' compute overlaps the server's work: a closed queue of W workers
    and one server. With t = receive + update + answer, the server's seconds per gradient, and z a
    worker's compute and fixed cost, a worker alone would push every z + t seconds and the server
    can take one gradient every t: X = min(W / (z + t), 1 / t) gradients/s (the bounds of a closed
    queue, reached when times vary little). ps_train counts W gradients as a step and reports
    samples/s = W rows / (W / X), so the step is W / X = max(z + t, W t); where the server is the
    bottleneck each worker waits W t - (z + t) in its queue ("server queue"). --staleness-lr costs
    nothing here: it divides the update's learning rate, one scalar."""
    itemsize = np.dtype(config.dtype).itemsize
    n_dense = len(widths) - 1
    layers = local_layers(widths, 1, 0, (0, n_dense))
    rows = local_batch_sizes(config.batch_size, spec.dp)[0]
    compute = whole_model_compute(machine, widths, rows, itemsize)
    share = -(-n_params(layers) // spec.servers)
    same_node = spec.world <= ranks_per_node
    message = p2p_time(profile, share * itemsize, same_node)
    update = optimizer_time(machine, config, share, itemsize)
    overhead = profile["step_overhead_s"]
    terms = {"compute": compute, "tensor": 0.0, "pipeline": 0.0, "bubble": 0.0}
    if spec.ps_mode == "async":
        per_gradient = 2 * message + update
        queue = max(0.0, spec.dp * per_gradient - (compute + overhead + per_gradient))
        terms.update({"data": 2 * message, "optimizer": update, "server queue": queue, "overhead": overhead})
    else:
        server = spec.dp * (2 * message + machine.stream(3 * share * itemsize)) + update
        terms.update({"data": server, "optimizer": 0.0, "overhead": overhead})
    traffic, memory = usage(spec, config, widths, ranks_per_node)
    return terms, traffic, memory
