"""`mpitrain plan --calibrate`: measure a machine profile on the current allocation. Collective.

    mpirun -n 4 mpitrain plan --calibrate --model 784-4096-4096-10 --batch-size 1024 --out machine.json

What is measured, every rank at once (as in training, so shared caches and memory are shared):
  GEMM FLOP/s at the model's shapes: each layer's (rows, in, out) and its weight gradient's
          (in, rows, out), for rows = the batch, a quarter and a sixteenth of it, and out cut in
          halves and quarters as tensor groups cut it; one BLAS thread per rank, divided by the
          rank's share of a core where ranks outnumber cores, so the rate is per core; and again
          with every core's thread on rank 0 alone
  memory bandwidth by working set, measured as an Adam step (the optimizer is most of the
          element-wise work): one rank alone (per core), then all ranks at once (per node)
  the fixed cost of one array call, and of one training step (a 16-16-2 model's step)
  point-to-point alpha and beta: a ping-pong between rank 0 and rank 1 (within a node) and
          between rank 0 and the first rank of the next node (across nodes, when there is one),
          fitted by least squares
  the all-reduce curves of every algorithm at this world size (comm/tune.py's timing)
  the rates as a step sees them: the model's own one-rank step (forward and backward, then the
          update) timed with every core's threads on rank 0 alone and with a thread per rank on
          every rank at once; each part over its prediction scales the GEMM or stream rates
  the overlap efficiency: data-parallel steps of the model with the gradient buckets' sums
          overlapped with backward and without, alternated; the seconds overlap saved over the
          seconds the plan's buckets could hide at most (more than one rank only)
A profile already at --out is updated: its curves of other world sizes are kept.
"""

import contextlib
import io
import os
import time

import numpy as np
from mpi4py import MPI

from mpitrain.backend import available_cores, settle_threads, step_finite
from mpitrain.comm import agree, local_rank_and_size
from mpitrain.comm.hier import node_group
from mpitrain.comm.tune import CANDIDATES, SHARDED_CANDIDATES, measure
from mpitrain.errors import MpitrainError
from mpitrain.plan.cost import OPTIMIZER_PASSES
from mpitrain.plan.profile import FORMAT, check

ALLREDUCE_SIZES = [1 << e for e in range(10, 27, 2)]   # 1 KiB .. 64 MiB
PING_SIZES = [1 << e for e in range(3, 23, 2)]         # 8 B .. 4 MiB
STREAM_SIZES = [5 << e for e in range(14, 28, 2)]      # working sets of 80 KiB .. 320 MiB


def polite_barrier(comm: MPI.Intracomm) -> None:
    """A barrier that sleeps while it waits: a rank spinning in MPI would steal the core of a rank
    being timed when ranks outnumber cores."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.002)


def timed(work, seconds: float = 0.05) -> float:
    """Median seconds per call of work() over repeats filling about `seconds` (at least 3)."""
    work()
    started = time.perf_counter()
    work()
    once = max(time.perf_counter() - started, 1e-7)
    reps = max(3, min(1000, int(seconds / once)))
    samples = []
    for _ in range(reps):
        started = time.perf_counter()
        work()
        samples.append(time.perf_counter() - started)
    return float(np.median(samples))


def gemm_shapes(widths: list[int], batch: int, world: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of every product a layer slice may run: rows at every power of two from batch/16
    to the batch (micro-batches and data-parallel shares; the plan takes the nearest measured row
    count, so a missing one cost a factor of 2-3 in a prediction) and batch/world, for whole,
    half and quarter layers, forward (rows, in, out) and weight gradient (in, rows, out)."""
    rows_at = {batch, max(1, batch // world)}
    rows = max(1, batch // 16)
    while rows < batch:
        rows_at.add(rows)
        rows *= 2
    shapes = set()
    for rows in rows_at:
        for n_in, n_out in zip(widths[:-1], widths[1:]):
            for cut in (1, 2, 4):
                out = max(1, n_out // cut)
                shapes.add((rows, n_in, out))
                shapes.add((n_in, rows, out))
    return sorted(shapes)


def measure_gemm(comm, widths, batch, dtype, share: float, cores: int, passes: int = 3) -> list[dict]:
    """Each shape with one BLAS thread on every rank at once (per core), then with every core's
    thread on rank 0 alone (what a rank alone on a node gets: threads rarely scale perfectly).
    Each rate is the median of `passes` passes over all the shapes, so that a slow moment of a
    shared machine moves one pass of every shape rather than every pass of a few."""
    from threadpoolctl import threadpool_limits

    entries = []
    settle_threads()  # threads a phase before this one left spinning would take the timed ranks' cores
    for threads in sorted({1, cores}):
        shapes = gemm_shapes(widths, batch, comm.size)
        rates = {shape: [] for shape in shapes}
        with threadpool_limits(limits=threads, user_api="blas"):
            for _ in range(passes):
                for m, k, n in shapes:
                    a, b = np.ones((m, k), dtype=dtype), np.ones((k, n), dtype=dtype)
                    out = np.empty((m, n), dtype=dtype)
                    polite_barrier(comm)
                    if threads == 1:
                        seconds = comm.allreduce(timed(lambda: np.matmul(a, b, out=out), 0.03), op=MPI.SUM) / comm.size
                        rates[m, k, n].append(2 * m * k * n / seconds / share)
                    else:
                        seconds = timed(lambda: np.matmul(a, b, out=out), 0.03) if comm.rank == 0 else 0.0
                        polite_barrier(comm)  # the others wait asleep: a rank spinning in bcast took a core
                        rates[m, k, n].append(2 * m * k * n / comm.bcast(seconds, root=0))
        entries += [{"dtype": np.dtype(dtype).name, "m": m, "k": k, "n": n, "threads": threads,
                     "flops_per_s": float(np.median(rates[m, k, n]))} for m, k, n in shapes]
    settle_threads()  # rank 0's workers of the all-cores pass: what follows times every rank
    return entries


def stream_rate(working: int) -> float:
    """Bytes/s of element-wise work on a working set of `working` bytes, measured as the model
    counts it: one Adam step over float32 buffers (params, grads, m, v, scratch), 28 buffer passes."""
    from mpitrain.optim import Adam

    count = max(1, working // (5 * 4))
    optimizer = Adam(np.zeros(count, dtype=np.float32), np.ones(count, dtype=np.float32), lr=1e-3)
    return OPTIMIZER_PASSES["adam"][0] * count * 4 / timed(lambda: optimizer.step(), 0.1)


def ping_pong(comm, partner: int, sizes: list[int]) -> tuple[float, float] | None:
    """(alpha, beta) from one-way times rank 0 <-> partner, least squares; None without a partner."""
    if partner >= comm.size:
        return None
    times = []
    for nbytes in sizes:
        buf = np.zeros(nbytes, dtype=np.uint8)
        polite_barrier(comm)
        seconds = 0.0
        if comm.rank in (0, partner):
            # Both ranks run the same count of exchanges (a count from each rank's own timing
            # would differ and leave one waiting): 5 trials of 10 round trips, the median.
            other, trials = partner if comm.rank == 0 else 0, []
            for _ in range(5):
                started = time.perf_counter()
                for _ in range(10):
                    if comm.rank == 0:
                        comm.Send(buf, other, 7)
                        comm.Recv(buf, other, 7)
                    else:
                        comm.Recv(buf, other, 7)
                        comm.Send(buf, other, 7)
                trials.append((time.perf_counter() - started) / 20)
            seconds = float(np.median(trials))
        polite_barrier(comm)  # the ranks not timed wait asleep, off the timed pair's cores
        times.append(comm.allreduce(seconds, op=MPI.MAX))
    beta, alpha = np.polyfit(np.array(sizes, dtype=float), np.array(times), 1)
    return max(float(alpha), 0.0), max(float(beta), 1e-13)


def step_overhead(comm, dtype: str) -> float:
    """Seconds per training step of a model too small to compute: the loop, checks and agreement."""
    import dataclasses

    from mpitrain.config import TrainConfig, validate
    from mpitrain.train import train

    config = validate(dataclasses.replace(TrainConfig(), model="16-16-2", batch_size=comm.size * 4, steps=60,
                                          synth_samples=comm.size * 4 * 60, val_fraction=0.0, progress=False,
                                          device="cpu", dtype=dtype, allreduce="mpi"))
    with contextlib.redirect_stdout(io.StringIO()):
        record = train(config, comm).history[-1]
    return config.batch_size / record["samples_per_s"]


def _model_config(widths: list[int], batch: int, dtype: str, **changes):
    """The validated TrainConfig of the model being calibrated, on the CPU, with `changes`."""
    import dataclasses

    from mpitrain.config import TrainConfig, validate

    return validate(dataclasses.replace(TrainConfig(), model="-".join(map(str, widths)), batch_size=batch,
                                        dtype=dtype, device="cpu", progress=False, **changes))


def _rows(widths: list[int], rows: int, dtype: str, seed: int):
    """(x, y): `rows` synthetic rows for the model, held in memory."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, widths[0])).astype(dtype), rng.integers(0, widths[-1], rows)


def _one_rank_step(widths: list[int], batch: int, dtype: str):
    """(config, a one-rank GridStrategy of the model, x, y): a training step on `batch` rows."""
    from mpitrain.backend import select_backend
    from mpitrain.parallel.strategy import GridStrategy

    config = _model_config(widths, batch, dtype)
    strategy = GridStrategy(config, MPI.COMM_SELF, widths, select_backend("cpu", MPI.COMM_SELF))
    return (config, strategy, *_rows(widths, batch, dtype, 0))


def _step_parts(strategy, x, y, threads: int, reps: int, comm=None) -> tuple[float, float]:
    """Median seconds of (forward and backward, NaN/Inf check and update) over `reps` steps with
    `threads` BLAS threads; with comm, the ranks of comm start each step together, as synchronous
    training does (so that their updates stream memory at the same time). Collective on comm
    when given."""
    from threadpoolctl import threadpool_limits

    parts = []
    with threadpool_limits(limits=threads, user_api="blas"):
        for rep in range(reps + 1):  # the first allocates what the others reuse
            if comm is not None:
                polite_barrier(comm)
            started = time.perf_counter()
            loss = strategy.forward_backward(x, y)
            middle = time.perf_counter()
            step_finite(loss, strategy.grads_to_check)  # the loop's NaN/Inf check, priced with the update
            strategy.update(1e-6)
            if rep:
                parts.append((middle - started, time.perf_counter() - middle))
    return float(np.median([p[0] for p in parts])), float(np.median([p[1] for p in parts]))


def step_scaled(comm: MPI.Intracomm, widths: list[int], batch: int, dtype: str, profile: dict,
                reps: int = 5) -> dict:
    """The profile with its GEMM and stream rates scaled to what a training step gets. Collective.

    Rates timed in a tight loop keep their operands in cache and the BLAS threads spinning; a step
    runs its products between element-wise work and the optimizer's sweep over memory, so they
    come out slower there. The model's own one-rank step is timed (GridStrategy on COMM_SELF,
    `batch` rows held in memory, the median of `reps` steps): with every core's BLAS threads on
    rank 0 alone (the others asleep), and with the threads a rank gets in training on every rank
    at once, each step started together (per core, as measure_gemm); scale_to_step fits the
    rates to those times."""
    _, ranks_on_node = local_rank_and_size(comm)
    cores = profile["cores_per_node"]
    share = min(1.0, cores / ranks_on_node)
    config, strategy, x, y = _one_rank_step(widths, batch, dtype)
    polite_barrier(comm)
    alone = _step_parts(strategy, x, y, cores, reps) if comm.rank == 0 else (0.0, 0.0)
    settle_threads()  # rank 0's idle workers spun on for 0.1 s: in that time `together` took 2-3x as long
    polite_barrier(comm)
    together = _step_parts(strategy, x, y, max(1, cores // ranks_on_node), reps, comm)
    alone = comm.bcast(alone, root=0)
    together = tuple(comm.allreduce(seconds * share, op=MPI.SUM) / comm.size for seconds in together)
    strategy.close()
    return scale_to_step(profile, config, widths, min(ranks_on_node, cores), alone, together)


def _linear_solve(seconds_at, target: float) -> float | None:
    """k with seconds_at(k) = target, for seconds_at linear in k (rates divided by k); None where
    no positive k gives it (the target below the prediction's fixed per-call costs)."""
    slope = seconds_at(2.0) - seconds_at(1.0)
    k = (target - (seconds_at(1.0) - slope)) / slope if slope > 0 else 0.0
    return k if k > 0 else None


def _gemm_divided(profile: dict, threads: int, k: float) -> dict:
    """The profile with the GEMM rates a rank of `threads` BLAS threads uses divided by k: its own
    entries, or the one-thread entries Machine scales where it has none (and the default rate)."""
    own = any(e.get("threads", 1) == threads for e in profile["gemm"])
    which = threads if own else 1
    out = {**profile, "gemm": [{**e, "flops_per_s": e["flops_per_s"] / k} if e.get("threads", 1) == which else e
                               for e in profile["gemm"]]}
    if which == 1:
        out["gemm_flops_per_s"] = {name: rate / k for name, rate in profile["gemm_flops_per_s"].items()}
    return out


def scale_to_step(profile: dict, config, widths: list[int], ranks_on_node: int,
                  alone: tuple[float, float], together: tuple[float, float]) -> dict:
    """The profile whose predictions of a one-rank step equal the measured (forward and backward,
    update) seconds: `alone`, rank 0 alone on the node with every core's threads, and
    `together`, per core, every rank of `ranks_on_node` at once. The stream rates are divided by
    what makes update_time (the NaN/Inf check and the update) the update together, then
    stream_alone_factor set so it is the update alone; the GEMM rates of each thread count are
    divided by what makes whole_model_compute its forward and backward (every prediction is linear in 1 / rate, so
    each factor is solved exactly from two evaluations). The factors are named in the source."""
    from mpitrain.parallel.grid import dense_param_counts
    from mpitrain.plan.timing import Machine, update_time, whole_model_compute

    dtype, itemsize = config.dtype, np.dtype(config.dtype).itemsize
    count = sum(dense_param_counts(widths))

    def stream_divided(k, alone_factor=1.0):
        return {**profile, "stream": [{**e, "bytes_per_s": e["bytes_per_s"] / k} for e in profile["stream"]],
                "memory_bandwidth_per_core": profile["memory_bandwidth_per_core"] / k,
                "memory_bandwidth_per_node": profile["memory_bandwidth_per_node"] / k,
                "stream_alone_factor": alone_factor}

    unfitted = []
    stream = _linear_solve(lambda k: update_time(Machine(stream_divided(k), ranks_on_node, dtype), config, count,
                                                 count, itemsize), together[1])
    if stream is None:
        stream = 1.0
        unfitted.append("stream")
    slower = _linear_solve(lambda k: update_time(Machine(stream_divided(stream, 1 / k), 1, dtype), config, count,
                                                 count, itemsize), alone[1]) or 1.0
    scaled = stream_divided(stream, 1 / slower)
    factors = {}
    # One rank per node: both measurements price the same rates; the second refines the first.
    for ranks, seconds in ((1, alone[0]), (ranks_on_node, together[0])):
        threads = Machine(scaled, ranks, dtype).threads
        factor = _linear_solve(lambda k: whole_model_compute(Machine(_gemm_divided(scaled, threads, k), ranks, dtype),
                                                             widths, config.batch_size, itemsize), seconds)
        if factor is None:
            unfitted.append(f"GEMM {threads} thread(s)")
            continue
        scaled, factors[threads] = _gemm_divided(scaled, threads, factor), factors.get(threads, 1.0) * factor
    named = ", ".join(f"{threads} thread(s) /{factor:.2f}" for threads, factor in sorted(factors.items()))
    scaled["source"] = (f"{profile['source']}; rates scaled to a step's: GEMM {named or 'none'}, stream "
                        f"/{stream:.2f}, a rank alone streams x{1 / slower:.2f}"
                        + (f"; not fitted (the step took less than the fixed per-call costs): {', '.join(unfitted)}"
                           if unfitted else ""))
    return check(scaled, "calibration")


def overlap_efficiency(comm: MPI.Intracomm, widths: list[int], batch: int, dtype: str, profile: dict,
                       rounds: int = 3, seconds: float = 1.0, allreduce: str = "auto") -> float:
    """Share (0..1) of the overlappable gradient-sum seconds that --overlap really hides here.
    Collective; 0.0 on one rank, or where the plan's buckets could hide under 5 % of a step (a
    saving that small is inside the step's noise on a shared machine, and moves no prediction).

    Both variants train the model data-parallel over comm (GridStrategy, the same bucketed sum as
    training, with `allreduce`, on a batch held in memory), `rounds` times alternately, each timing
    enough steps to fill about `seconds` (a step is the slowest rank's); each variant's step is
    its median. The
    plan prices the same layout with efficiency 1 and 0: their difference is what overlap could
    hide at most (timing.exposed_sync), and the measured saving over it is the efficiency."""
    import dataclasses

    from threadpoolctl import threadpool_limits

    from mpitrain.backend import select_backend
    from mpitrain.parallel.strategy import GridStrategy
    from mpitrain.plan.cost import Spec
    from mpitrain.plan.timing import predict

    if comm.size == 1:
        return 0.0
    _, ranks_on_node = local_rank_and_size(comm)
    base = _model_config(widths, batch, dtype, allreduce=allreduce)
    spec = Spec("grid", comm.size, algorithm=allreduce)
    # Priced on rank 0 alone (predict reads the tuning file for auto's choice), so that every rank
    # takes the same branch below even where the ranks' files differ.
    prices, error = None, None
    if comm.rank == 0:
        try:
            prices = [predict(spec, base, widths, ranks_on_node, {**profile, "overlap_efficiency": share}).step_s
                      for share in (1.0, 0.0)]
        except MpitrainError as exc:
            error = exc
    agree(comm, error)
    hidden, exposed = comm.bcast(prices, root=0)
    if exposed - hidden < 0.05 * exposed:
        return 0.0
    x, y = _rows(widths, batch // comm.size + (comm.rank < batch % comm.size), dtype, comm.rank)
    backend = select_backend("cpu", comm)
    strategies = [GridStrategy(dataclasses.replace(base, overlap=overlap), comm, widths, backend)
                  for overlap in (True, False)]
    steps = max(2, min(50, int(seconds / exposed)))
    times = [[], []]
    with threadpool_limits(limits=max(1, available_cores() // ranks_on_node), user_api="blas"):
        _alternate(comm, strategies, x, y, rounds, steps, times)
    for strategy in strategies:
        strategy.close()
    return hidden_share(float(np.median(times[0])), float(np.median(times[1])), exposed - hidden)


def _alternate(comm, strategies, x, y, rounds: int, steps: int, times: list[list[float]]) -> None:
    """Append each strategy's seconds per step (the slowest rank's), the strategies taking turns."""
    for _ in range(rounds):
        for strategy, samples in zip(strategies, times):
            strategy.forward_backward(x, y)  # the first step after the other variant's refills the caches
            strategy.update(1e-6)
            polite_barrier(comm)
            started = time.perf_counter()
            for _ in range(steps):
                strategy.forward_backward(x, y)
                strategy.update(1e-6)
            samples.append(comm.allreduce((time.perf_counter() - started) / steps, op=MPI.MAX))


def hidden_share(with_overlap: float, without: float, could_hide: float) -> float:
    """(without - with_overlap) / could_hide, kept within 0..1 (seconds; noise can push it out)."""
    return float(min(1.0, max(0.0, (without - with_overlap) / could_hide)))


def calibrate(comm: MPI.Intracomm, widths: list[int], batch: int, dtype: str, previous: dict | None) -> dict:
    """The measured profile (on every rank); `previous` (a profile) keeps its curves of other sizes."""
    _, ranks_on_node = local_rank_and_size(comm)
    cores = available_cores()
    share = min(1.0, cores / ranks_on_node)
    gemm = measure_gemm(comm, widths, batch, dtype, share, cores)
    polite_barrier(comm)
    alone = stream_rate(STREAM_SIZES[-1]) if comm.rank == 0 else 0.0
    polite_barrier(comm)
    together = comm.allreduce(stream_rate(STREAM_SIZES[-1]), op=MPI.SUM) / comm.size
    rates = {working: [] for working in STREAM_SIZES}
    for _ in range(3):  # passes over the sizes, the median of each (as measure_gemm)
        for working in STREAM_SIZES:
            polite_barrier(comm)
            rates[working].append(comm.allreduce(stream_rate(working), op=MPI.SUM) / comm.size)
    stream = [{"bytes": working, "bytes_per_s": float(np.median(rates[working])) / share} for working in STREAM_SIZES]
    small_a, small_b = np.ones(16), np.ones(16)
    op = comm.allreduce(timed(lambda: np.add(small_a, small_b, out=small_a), 0.02), op=MPI.SUM) / comm.size
    nodes = node_group(comm).nodes
    intra = ping_pong(comm, 1, PING_SIZES) if ranks_on_node > 1 else None
    inter = ping_pong(comm, ranks_on_node, PING_SIZES) if nodes > 1 else None
    link = {"alpha_s": 2e-6, "beta_s_per_byte": 1.0 / together}  # one rank: copies stand in for messages
    intra = {"alpha_s": intra[0], "beta_s_per_byte": intra[1]} if intra else link
    curves = []
    if comm.size > 1:
        # Each algorithm's all-reduce, and (--zero's buckets) its reduce-scatter + all-gather pair.
        for kind, algorithms in (("allreduce", CANDIDATES), ("halves", SHARDED_CANDIDATES)):
            seconds = measure(comm, ALLREDUCE_SIZES, algorithms, trials=3, sharded=kind == "halves")
            curves += [{"algorithm": name, "ranks": comm.size, "nodes": nodes, "bytes": ALLREDUCE_SIZES,
                        "seconds": seconds[name], "kind": kind} for name in seconds]
    overhead = step_overhead(comm, dtype)
    profile = {
        "format": FORMAT, "name": os.uname().nodename,
        "source": f"mpitrain plan --calibrate on {comm.size} rank(s), {ranks_on_node} per node, "
                  f"{time.strftime('%Y-%m-%d %H:%M')}; {MPI.Get_library_version().splitlines()[0].strip()}",
        "cores_per_node": cores,
        "gemm_flops_per_s": {np.dtype(dtype).name: float(np.median([e["flops_per_s"] for e in gemm
                                                                      if e["threads"] == 1]))},
        "gemm": gemm,
        "memory_bandwidth_per_core": comm.bcast(alone, root=0) / 1.0,
        "memory_bandwidth_per_node": together * min(ranks_on_node, cores) / share,
        "op_overhead_s": op * share, "message_overhead_s": 0.0,
        "step_overhead_s": overhead * share, "overlap_efficiency": 0.0,
        "links": {"intra": intra, "inter": {"alpha_s": inter[0], "beta_s_per_byte": inter[1]} if inter else intra},
        "collectives": curves, "stream": stream,
    }
    profile = step_scaled(comm, widths, batch, dtype, check(profile, "calibration"))
    profile["overlap_efficiency"] = overlap_efficiency(comm, widths, batch, dtype, profile)
    if previous:
        # One node here: keep the inter-node link of a calibration across nodes (one of a single
        # node wrote its intra-node link there: that one is not kept).
        if inter is None and previous["links"]["inter"] != previous["links"]["intra"]:
            profile["links"]["inter"] = previous["links"]["inter"]
        kept = [c for c in previous["collectives"] if (c["algorithm"], c["ranks"], c["nodes"], c["kind"]) not in
                {(c2["algorithm"], c2["ranks"], c2["nodes"], c2["kind"]) for c2 in curves}]
        profile["collectives"] = kept + curves
        shapes = {(e["dtype"], e["m"], e["k"], e["n"], e["threads"]) for e in gemm}
        profile["gemm"] = [e for e in previous["gemm"]
                           if (e["dtype"], e["m"], e["k"], e["n"], e.get("threads", 1)) not in shapes] + profile["gemm"]
        profile["gemm_flops_per_s"] = {**previous["gemm_flops_per_s"], **profile["gemm_flops_per_s"]}
    return check(profile, "calibration")
