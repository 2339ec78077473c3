"""--grad-dtype float16, bfloat16: the exchange equals its serial oracle bit for bit, halves the bytes
sent, stays within the wire dtype's precision of the float32 run over 50 steps, error feedback
reduces the accumulated error, and nothing is allocated per step after the first."""

import tracemalloc

import numpy as np
import pytest

from groups import groups_of
from mpitrain.comm import traffic
from mpitrain.comm.buckets import GradientSync
from mpitrain.comm.compress import CompressedSum, wire_dtype
from mpitrain.comm.ring import chunk_bounds, complete
from mpitrain.errors import MpitrainError
from mpitrain.nn.model import Model
from mpitrain.train import train
from parallel_runs import config

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
            summer, buf = CompressedSum(wire_dtype(wire), feedback), np.empty(301, np.float32)
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
                        compressed=CompressedSum(np.dtype("float16"), error_feedback=True))
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
