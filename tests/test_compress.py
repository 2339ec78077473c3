"""--grad-dtype float16, bfloat16: the exchange equals its serial oracle bit for bit, halves the bytes
sent, stays within the wire dtype's precision of the float32 run over 50 steps, error feedback
reduces the accumulated error, and nothing is allocated per step after the first. The residual
follows the gradient entries, a checkpoint holds its sum over the data-parallel group (each
rank's residual added in rank order, bit for bit), and a resume under any world size, layout or
--zero stage restores that sum bit for bit."""

import os
import tracemalloc

import numpy as np
import pytest
from mpi4py import MPI

from groups import groups_of
from mpitrain.backend import select_backend
from mpitrain.checkpoint import checkpoint_name, load_checkpoint, save_checkpoint
from mpitrain.comm import traffic
from mpitrain.comm.buckets import GradientSync
from mpitrain.comm.compress import CompressedSum, wire_dtype
from mpitrain.comm.ring import chunk_bounds, complete
from mpitrain.errors import MpitrainError
from mpitrain.nn.model import Model, parse_widths
from mpitrain.parallel.strategy import GridStrategy
from mpitrain.train import train
from parallel_runs import config
from test_zero import LAYOUTS, SETTINGS, run

WIRES = ["float16", pytest.param("bfloat16", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("ml_dtypes") is None, reason="ml_dtypes is not installed"))]


def epsilon(wire: str) -> float:
    """Machine epsilon of a wire dtype (numpy's finfo does not know bfloat16; ml_dtypes' knows both)."""
    if wire == "bfloat16":
        import ml_dtypes

        return float(ml_dtypes.finfo(wire_dtype(wire)).eps)
    return float(np.finfo(wire_dtype(wire)).eps)


def gradients(rank: int, step: int, size: int = 301) -> np.ndarray:
    return (np.random.default_rng(1000 * step + rank).standard_normal(size) * 1e-2).astype(np.float32)


@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("gather", [True, False])
def test_the_exchange_is_its_serial_oracle_bit_for_bit(comm, wire, gather):
    """Owner's chunk: the rounded contributions added in rank order in float32; with gather every
    rank holds that sum rounded once more. Computed here from every rank's gradient, on every rank."""
    dtype, chunks = wire_dtype(wire), chunk_bounds(301, comm.size)
    buf = gradients(comm.rank, 0)
    before = traffic.sent()
    complete(CompressedSum(dtype).schedule(buf, comm, chunks, gather))
    rounded = [gradients(q, 0).astype(dtype).astype(np.float32) for q in range(comm.size)]
    total = rounded[0].copy()
    for other in rounded[1:]:
        total += other
    start, stop = chunks[comm.rank]
    if comm.size == 1:  # nothing to exchange: nothing is rounded
        np.testing.assert_array_equal(buf, gradients(0, 0))
    elif gather:
        np.testing.assert_array_equal(buf, total.astype(dtype).astype(np.float32))
    else:
        np.testing.assert_array_equal(buf[start:stop], total[start:stop])
    # Half the bytes of the float32 ring: (n - own chunk) to the owners, (n - right neighbour's) around the ring.
    expected = (301 - (stop - start)) * 2
    if gather:
        expected += (301 - np.diff(chunks[(comm.rank + 1) % comm.size])[0]) * 2
    assert traffic.sent() - before == (expected if comm.size > 1 else 0)


@pytest.mark.parametrize("wire", WIRES)
def test_error_feedback_keeps_the_summed_rounding_error_to_one_step(comm, wire):
    """Over 30 steps the sums of what was exchanged differ from the exact sums by the last step's
    residuals alone with feedback (each rank's, and the owner's of its sum: at most 3 half-ulps of
    the largest sum), and by 30 steps' roundings without."""
    with groups_of(comm, 2) as group:
        if group is None:
            return
        errors = {}
        for feedback in (False, True):
            summer, buf = CompressedSum(wire_dtype(wire), feedback, size=301), np.empty(301, np.float32)
            exact, exchanged, largest = np.zeros(301), np.zeros(301), 0.0
            for step in range(30):
                buf[...] = gradients(group.rank, step)
                complete(summer.schedule(buf, group, chunk_bounds(301, 2), gather=True))
                exact += sum(gradients(q, step).astype(np.float64) for q in range(2))
                exchanged += buf
                largest = max(largest, np.abs(buf).max())
            errors[feedback] = np.abs(exchanged - exact).max()
        residuals = 3 * epsilon(wire) / 2 * largest
        assert errors[True] <= residuals and errors[True] < errors[False] / 2, (errors, residuals)


@pytest.mark.parametrize("zero", [0, 1])
@pytest.mark.parametrize("wire", WIRES)
def test_fifty_steps_stay_within_the_wire_precision_and_feedback_helps(comm, small_classification, wire, zero):
    """Plain SGD, float32, 50 steps on 2 ranks: the parameters are within epsilon(wire) x max|theta| of
    the uncompressed run, and error feedback at least halves the distance (measured: 10-20x)."""
    base = dict(data=small_classification, model="12-3", dtype="float32", optimizer="sgd", lr=0.05,
                batch_size=64, steps=50, zero=zero)
    with groups_of(comm, 2) as group:
        if group is None:
            return
        reference = train(config(**base), group).parameters
        distance = {}
        for feedback in (False, True):
            got = train(config(grad_dtype=wire, error_feedback=feedback, **base), group).parameters
            distance[feedback] = max(np.abs(got[name] - value).max() for name, value in reference.items())
        scale = max(np.abs(value).max() for value in reference.values())
        assert 0 < distance[False] <= epsilon(wire) * scale, distance
        assert distance[True] < distance[False] / 2, distance


@pytest.mark.parametrize("zero,fraction", [(0, 0.5), (1, 0.75)])
def test_bytes_per_step_halve_where_gradients_travel(comm, small_classification, zero, fraction):
    """--zero 0: both halves carry gradients, so half the bytes; --zero 1: the parameters' all-gather
    stays full precision, so 3/4."""
    base = dict(data=small_classification, dtype="float32", steps=2, zero=zero, allreduce="ring")
    with groups_of(comm, 2) as group:
        if group is None:
            return
        full = train(config(**base), group).history[-1]["dp_bytes_per_step"]
        half = train(config(grad_dtype="float16", **base), group).history[-1]["dp_bytes_per_step"]
        assert half == pytest.approx(fraction * full, rel=0.01)


def test_steps_allocate_nothing_after_the_first(comm):
    model = Model([200, 400, 300, 10], dtype=np.float32)
    sync = GradientSync(model.grads, model.layer_grad_slices(), comm, "ring", bucket_mb=0.25,
                        compressed=CompressedSum(np.dtype("float16"), error_feedback=True, size=model.grads.size))
    for step in range(4):
        if step == 1:
            tracemalloc.start()
            start, _ = tracemalloc.get_traced_memory()
        model.grads[...] = 0.5
        for layer in reversed(range(len(model.dense))):
            sync.layer_done(layer)
        sync.wait()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak - start < 64 << 10, f"{peak - start} bytes allocated over 3 steps of a {model.grads.nbytes}-byte buffer"


def test_settings_that_cannot_compress_are_refused():
    with pytest.raises(MpitrainError, match="--allreduce ring or auto, not mpi"):
        config(dtype="float32", grad_dtype="float16", allreduce="mpi")
    with pytest.raises(MpitrainError, match="--error-feedback"):
        config(dtype="float32", error_feedback=True)
    with pytest.raises(MpitrainError, match="--grad-dtype 'int8'"):
        config(grad_dtype="int8")


# ---------------------------------------------------------------------------- the residual in checkpoints

FLOAT16 = np.dtype("float16")
# float32 parameters, float16 on the wire; test_zero's model and buckets: shards start and stop
# inside layers and rows, a bucket holds parts of several shards, --zero 2 stages two slots.
EF = dict(dtype="float32", grad_dtype="float16", error_feedback=True, optimizer="sgd", lr=0.05, **SETTINGS)


def own_residual(summer: CompressedSum) -> np.ndarray:
    """This rank's residual, through the public API: its sum over one rank."""
    return summer.residual_sum(MPI.COMM_SELF, [(0, summer.size)], np.float32)


def saved(path: str, prefix: str) -> dict:
    """A checkpoint's datasets under prefix ('residual/', 'model/', ...), read on every rank."""
    return {name: value for name, value in load_checkpoint(path).arrays.items() if name.startswith(prefix)}


def assert_same_arrays(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys() and expected
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("owners", ["shards", "rank 0"])
def test_the_residual_follows_the_entries_and_sums_in_rank_order(comm, owners):
    """Three buckets of a 301-entry buffer, each summed through one reused slot (as --zero 2 stages
    them) for 5 steps: each rank's residual is its serial oracle entry by entry (what rounding
    g + r to float16 lost, kept at the entry's offset, not the slot's), and residual_sum gives each
    owner every rank's residuals of its entries added in rank order, bit for bit."""
    size, cuts = 301, [(0, 100), (100, 250), (250, 301)]
    summer, slot = CompressedSum(FLOAT16, error_feedback=True, size=size), np.empty(150, np.float32)
    views = [slot[:b - a] for a, b in cuts]
    for step in range(5):
        for (a, b), view in zip(cuts, views):
            view[...] = gradients(comm.rank, step)[a:b]
            complete(summer.schedule(view, comm, chunk_bounds(b - a, comm.size), gather=False, offset=a))
    residuals = [np.zeros(size, np.float32) for _ in range(comm.size)]
    for q, residual in enumerate(residuals if comm.size > 1 else []):  # one rank rounds nothing
        for step in range(5):
            exact = gradients(q, step) + residual
            residual[...] = exact - exact.astype(FLOAT16).astype(np.float32)
    np.testing.assert_array_equal(own_residual(summer), residuals[comm.rank])
    owned = chunk_bounds(size, comm.size) if owners == "shards" else [(0, size)] + [(size, size)] * (comm.size - 1)
    start, stop = owned[comm.rank]
    total = np.zeros(stop - start, np.float32)
    for residual in residuals:
        total += residual[start:stop]
    np.testing.assert_array_equal(summer.residual_sum(comm, owned, np.float32), total)
    assert comm.size == 1 or comm.allreduce(np.abs(total).max(initial=0.0), op=MPI.MAX) > 0


def test_a_restored_residual_keeps_its_sum_and_one_rank_adds_it_once(comm):
    """set_residual gives each owner its part of a saved sum and the others nothing: residual_sum
    gives back the same bits. On one rank (where nothing is rounded) a restored residual is added
    to the next sum of its entries, once; the other entries keep theirs."""
    size, owed = 301, gradients(99, 0) * 1e-3
    owned = chunk_bounds(size, comm.size)
    start, stop = owned[comm.rank]
    summer = CompressedSum(FLOAT16, error_feedback=True, size=size)
    summer.set_residual(start, owed[start:stop])
    np.testing.assert_array_equal(summer.residual_sum(comm, owned, np.float32), owed[start:stop])

    alone = CompressedSum(FLOAT16, error_feedback=True, size=size)
    alone.set_residual(0, owed)
    for step in range(2):
        buf = gradients(comm.rank, step)[100:250].copy()
        complete(alone.schedule(buf, MPI.COMM_SELF, [(0, 150)], gather=True, offset=100))
        expected = gradients(comm.rank, step)[100:250] + (owed[100:250] if step == 0 else 0)
        np.testing.assert_array_equal(buf, expected)
    left = own_residual(alone)
    np.testing.assert_array_equal(left[100:250], 0)
    np.testing.assert_array_equal(np.delete(left, np.s_[100:250]), np.delete(owed, np.s_[100:250]))


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_the_saved_residual_is_the_data_parallel_groups_sum(comm, zero):
    """After 3 steps on every rank of comm: residual_sum gives each rank that holds a copy (rank 0,
    or under --zero each owner of a shard) the residuals of all ranks added in rank order over its
    shard, owner's rounding of the sum included; zeros on the others."""
    settings = config(**{**EF, "zero": zero})
    strategy = GridStrategy(settings, comm, parse_widths(settings.model), select_backend("cpu", comm))
    rng = np.random.default_rng(comm.rank)
    for _ in range(3):
        strategy.forward_backward(rng.standard_normal((6, 12)), rng.integers(0, 3, 6))
        strategy.update(0.05)
    got = strategy.residual_sum()
    mine = own_residual(strategy.compressed)
    everyone = comm.allgather(mine)
    start, stop = strategy.shard
    total = np.zeros(stop - start, np.float32)
    for residual in everyone:
        total += residual[start:stop]
    np.testing.assert_array_equal(got, total if strategy.holds_copy else 0)
    assert comm.size == 1 or np.abs(np.sum(everyone, axis=0)).max() > 0
    strategy.close()


def test_a_resume_restores_the_saved_sum_and_on_one_data_parallel_rank_repeats_the_run(comm, small_classification,
                                                                                      shared_dir):
    """Every rank of comm, --grad-dtype float16 --error-feedback: a run of 8 steps checkpoints at
    4; resumed there with nothing left to run, it saves the same residual, bit for bit; resumed to
    step 8, it repeats the uninterrupted run bit for bit on one data-parallel rank (nothing is
    rounded there), and on more ends closer to it than the same resume with the residual dropped
    (the file without its residual, as mpitrain wrote before it saved one)."""
    folder = os.path.join(shared_dir, "ck")
    base = dict(EF, data=small_classification)
    full = train(config(**base, steps=8, checkpoint_dir=folder, checkpoint_every=4), comm)
    written = os.path.join(folder, checkpoint_name(4))
    again = os.path.join(shared_dir, "again")
    train(config(**base, steps=4, resume=written, checkpoint_dir=again), comm)
    assert_same_arrays(saved(os.path.join(again, checkpoint_name(4)), "residual/"), saved(written, "residual/"))
    resumed = train(config(**base, steps=8, resume=written, checkpoint_dir=os.path.join(shared_dir, "r")), comm)
    if comm.size == 1:
        assert_same_arrays(resumed.parameters, full.parameters)
        return
    assert max(np.abs(value).max() for value in saved(written, "residual/").values()) > 0
    older = os.path.join(shared_dir, "older.h5")
    if comm.rank == 0:
        without_residual(written, older)
    comm.Barrier()
    dropped = train(config(**base, steps=8, resume=older, checkpoint_dir=os.path.join(shared_dir, "d")), comm)

    def distance(result):
        return np.sqrt(sum(np.sum((result.parameters[name] - value) ** 2) for name, value in full.parameters.items()))

    assert 0 < distance(resumed) < distance(dropped), (distance(resumed), distance(dropped))


def without_residual(path: str, out: str) -> None:
    """The checkpoint at path as mpitrain wrote it before it saved the residual: no residual/
    datasets and no 'residual' field (digest recomputed)."""
    checkpoint = load_checkpoint(path)
    checkpoint.meta.pop("residual")
    checkpoint.arrays = {name: value for name, value in checkpoint.arrays.items() if not name.startswith("residual/")}
    save_checkpoint(out, checkpoint)


@pytest.mark.parametrize("writer,reader", [(("dp2", 0), ("one", 0)), (("dp2", 0), ("dp4", 1)), (("dp4", 2), ("dp2", 0)),
                                           (("dp2-tp2", 1), ("dp2", 2)), (("dp2", 1), ("dp2-pp2", 0)),
                                           (("dp2-pp2", 2), ("dp2-tp2", 0))])
def test_the_summed_residual_resumes_across_world_sizes_layouts_and_zero_stages(comm, small_classification, shared_dir,
                                                                                writer, reader):
    """Written at step 4 by one (layout, --zero stage), resumed by another with no step left to run:
    its checkpoint holds the same summed residual and parameters, bit for bit. Resumed to step 6
    it trains on; on one rank, where nothing is rounded, the residual was added to the gradient
    at step 5 and the checkpoint of step 6 holds zeros."""
    (write_layout, write_zero), (read_layout, read_zero) = writer, reader
    base = dict(EF, data=small_classification)
    written = os.path.join(shared_dir, "ck", checkpoint_name(4))
    run(comm, LAYOUTS[write_layout], **base, steps=4, checkpoint_dir=os.path.dirname(written), zero=write_zero)
    comm.Barrier()
    for steps in (4, 6):
        folder = os.path.join(shared_dir, f"read{steps}")
        run(comm, LAYOUTS[read_layout], **base, steps=steps, resume=written, checkpoint_dir=folder, zero=read_zero)
        comm.Barrier()
    again = os.path.join(shared_dir, "read4", checkpoint_name(4))
    for prefix in ("residual/", "model/"):
        assert_same_arrays(saved(again, prefix), saved(written, prefix))
    assert max(np.abs(value).max() for value in saved(written, "residual/").values()) > 0
    later = saved(os.path.join(shared_dir, "read6", checkpoint_name(6)), "residual/")
    assert (max(np.abs(value).max() for value in later.values()) == 0) == (read_layout == "one")


def test_a_residual_is_dropped_with_a_warning_without_error_feedback_and_older_files_resume(comm, small_classification,
                                                                                            shared_dir, capfd):
    """Resumed without --error-feedback, a checkpoint's residual is dropped and rank 0 says so in
    one line; a checkpoint written before residuals were saved resumes with --error-feedback from a
    zero residual; --init-from takes a checkpoint that holds one."""
    base = dict(EF, data=small_classification)
    written = os.path.join(shared_dir, "ck", checkpoint_name(4))
    train(config(**base, steps=4, checkpoint_dir=os.path.dirname(written)), comm)
    capfd.readouterr()
    without = os.path.join(shared_dir, "without")
    train(config(**{**base, "error_feedback": False}, steps=6, resume=written, checkpoint_dir=without), comm)
    warned = comm.bcast(capfd.readouterr().err, root=0)  # rank 0 warns; every rank asserts alike
    assert warned.count("residual is dropped") == 1 and f"{written}: the checkpoint holds" in warned, warned
    assert not saved(os.path.join(without, checkpoint_name(6)), "residual/")
    older = os.path.join(shared_dir, "older.h5")
    if comm.rank == 0:
        without_residual(written, older)
    comm.Barrier()
    train(config(**base, steps=4, resume=older, checkpoint_dir=os.path.join(shared_dir, "older")), comm)
    zeros = saved(os.path.join(shared_dir, "older", checkpoint_name(4)), "residual/")
    assert zeros.keys() == saved(written, "residual/").keys() and all(not value.any() for value in zeros.values())
    started = train(config(**base, steps=0, init_from=written), comm)
    assert_same_arrays({f"model/{name}": value for name, value in started.parameters.items()}, saved(written, "model/"))
