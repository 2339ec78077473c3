"""Gradient buckets: the same sums as one flat all-reduce, bit-identical with and without
overlap, and no buffer allocated per step."""

import dataclasses
import tracemalloc

import numpy as np
import pytest

from mpitrain.comm import allreduce, ring
from mpitrain.comm.buckets import GradientSync, plan_buckets
from mpitrain.config import TrainConfig, validate
from mpitrain.errors import MpitrainError
from mpitrain.nn.model import Model
from mpitrain.train import train

ALGORITHMS = ["auto", "ring", "rd", "hier", "mpi"]


def test_buckets_are_whole_layers_from_the_last_and_stay_under_the_limit():
    slices = [(0, 100), (100, 150), (150, 160), (160, 400)]
    mib = 1 << 20
    assert plan_buckets(slices, 4, 60 * 4 / mib) == [(160, 400, 3), (100, 160, 1), (0, 100, 0)]
    assert plan_buckets(slices, 4, 1000) == [(0, 400, 0)]
    assert plan_buckets(slices, 4, 1e-9) == [(160, 400, 3), (150, 160, 2), (100, 150, 1), (0, 100, 0)]


def backward_pass(sync: GradientSync, layers: int) -> None:
    """What Model.backward does for the sync: report layers done, last first."""
    for layer in reversed(range(layers)):
        sync.layer_done(layer)


def model_grads(comm, seed: int = 0):
    model = Model([13, 40, 30, 20, 3], dtype=np.float32)
    model.grads[...] = np.random.default_rng(100 * comm.rank + seed).standard_normal(model.grads.size)
    return model


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("overlap", [True, False])
def test_buckets_equal_one_flat_allreduce(comm, algorithm, overlap):
    model = model_grads(comm)
    flat = model.grads.copy()
    allreduce(flat, comm, "mpi")
    sync = GradientSync(model.grads, model.layer_grad_slices(), comm, algorithm, bucket_mb=2e-3, overlap=overlap)
    backward_pass(sync, len(model.dense))
    sync.wait()
    assert len(sync.buckets) > 2
    np.testing.assert_allclose(model.grads, flat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_overlap_gives_bit_identical_parameters_after_several_steps(comm, tmp_path, algorithm):
    from mpitrain.data import synth

    path = comm.bcast(str(tmp_path / "small.h5") if comm.rank == 0 else None, root=0)
    if comm.rank == 0:
        synth.write_h5(path, *synth.make_classification(240, 12, 3, seed=3))
    comm.Barrier()
    base = validate(dataclasses.replace(TrainConfig(), data=path, model="12-32-16-3", batch_size=24, steps=6,
                                        device="cpu", progress=False, allreduce=algorithm, bucket_mb=1e-3))
    on = train(dataclasses.replace(base, overlap=True), comm).parameters
    off = train(dataclasses.replace(base, overlap=False), comm).parameters
    for name in on:
        np.testing.assert_array_equal(on[name], off[name], err_msg=name)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_steps_allocate_no_gradient_or_communication_buffers(comm, algorithm):
    """After a first step, further steps allocate no buffers: tracemalloc sees only small objects
    (requests, views), and the gradient buffer and the ring's scratch are the same objects."""
    model = Model([200, 400, 300, 10], dtype=np.float32)
    grads_before = model.grads
    sync = GradientSync(model.grads, model.layer_grad_slices(), comm, algorithm, bucket_mb=0.25, overlap=True)
    backward_pass(sync, len(model.dense))
    sync.wait()
    scratch = ring.scratch_buffer(np.dtype(np.float32), 1)
    tracemalloc.start()
    start, _ = tracemalloc.get_traced_memory()
    for _ in range(3):
        model.grads *= 0.5
        backward_pass(sync, len(model.dense))
        sync.wait()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert model.grads is grads_before and all(np.shares_memory(view, model.grads) for view in sync.views)
    assert ring.scratch_buffer(np.dtype(np.float32), 1) is scratch
    assert peak - start < 64 << 10, f"{peak - start} bytes allocated over 3 steps of a {model.grads.nbytes}-byte buffer"


@pytest.mark.parametrize("zero", [0, 1, 2])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_training_steps_allocate_no_activation_or_gradient_buffers(comm, zero, activation):
    """The whole step of the loop (forward, loss, backward, the gradient sum, the update and under
    --zero the parameters' all-gather) allocates nothing after the first step: a (64, 400)
    activation alone is 100 KiB, above the bound."""
    from mpitrain.backend import select_backend
    from mpitrain.parallel.strategy import GridStrategy

    config = validate(dataclasses.replace(TrainConfig(), model="200-400-300-10", batch_size=64 * comm.size,
                                          device="cpu", zero=zero, activation=activation, bucket_mb=0.25))
    strategy = GridStrategy(config, comm, [200, 400, 300, 10], select_backend("cpu", comm))
    rng = np.random.default_rng(comm.rank)
    x, y = rng.standard_normal((64, 200), dtype=np.float32), rng.integers(0, 10, 64)
    for step in range(5):
        if step == 2:
            tracemalloc.start()
            start, _ = tracemalloc.get_traced_memory()
        strategy.forward_backward(x, y)
        strategy.update(1e-3)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    strategy.close()
    assert peak - start < 64 << 10, f"{peak - start} bytes allocated over 3 steps"


def test_rejects_bad_settings_before_communicating(comm):
    model = model_grads(comm)
    with pytest.raises(MpitrainError, match="--bucket-mb 0"):
        GradientSync(model.grads, model.layer_grad_slices(), comm, "ring", bucket_mb=0)
    with pytest.raises(MpitrainError, match="--allreduce 'tree'"):
        GradientSync(model.grads, model.layer_grad_slices(), comm, "tree")
