"""The GPU path against the CPU: the same run on CuPy and on NumPy, host reads and device memory per step.

Every test here skips, saying why, without CuPy or a visible CUDA device; `benchmarks/gpu_check.sh`
runs them on a GPU machine under `mpirun -n 1` and `mpirun -n 2` (two ranks sharing one GPU).
"""

import dataclasses

import numpy as np
import pytest

from mpitrain import backend
from mpitrain.config import TrainConfig, validate
from mpitrain.parallel.strategy import GridStrategy
from mpitrain.train import train
from conftest import cupy_or_skip

STEPS = 20


def settings(data: str, **overrides) -> TrainConfig:
    base = dict(model="12-32-16-3", data=data, batch_size=24, device="cpu", progress=False, sampler="global",
                dtype="float64", optimizer="adam", lr=0.01, steps=STEPS, epochs=1, seed=11)
    return validate(dataclasses.replace(TrainConfig(), **{**base, **overrides}))


@pytest.mark.parametrize("tp", [1, 2], ids=["dp", "tp2"])
def test_gpu_parameters_equal_the_cpu_run(comm, small_classification, tp):
    """Parameters after 20 Adam steps in float64 on the GPU equal the NumPy run's to 1e-10
    relative, data parallel and tensor parallel (the CPU run is the oracle, same ranks)."""
    cupy_or_skip()
    if comm.size % tp:
        pytest.skip(f"--tp {tp} needs a world size divisible by {tp}")
    cpu = train(settings(small_classification, tp=tp), comm)
    gpu = train(settings(small_classification, tp=tp, device="gpu"), comm)
    assert gpu.parameters.keys() == cpu.parameters.keys()
    for name, expected in cpu.parameters.items():
        np.testing.assert_allclose(gpu.parameters[name], expected, rtol=1e-10, atol=1e-12, err_msg=name)
    assert gpu.history[-1]["loss"] == pytest.approx(cpu.history[-1]["loss"], rel=1e-10)


def test_gpu_step_reads_the_device_once(comm, small_classification):
    """As on the CPU (tests/test_backend.py): one device-to-host read per data-parallel step."""
    cupy_or_skip()
    counts = []
    for steps in (3, 9):
        before = dataclasses.replace(backend.HOST)
        train(settings(small_classification, device="gpu", steps=steps), comm)
        counts.append((backend.HOST.reads - before.reads, backend.HOST.syncs - before.syncs))
    assert counts[1][0] - counts[0][0] == 9 - 3
    assert counts[1][1] == counts[0][1]


def test_gpu_steps_allocate_no_new_device_memory(comm):
    """After the first step, a step takes no new block from CuPy's memory pool (its total stays
    put) and gives back everything it took (the bytes in use return to the same figure)."""
    cupy = cupy_or_skip()
    config = settings(None, model="64-256-256-10", dtype="float32", device="gpu")
    strategy = GridStrategy(config, comm, [64, 256, 256, 10], backend.select_backend("gpu", comm))
    rng = np.random.default_rng(comm.rank)
    x = cupy.asarray(rng.standard_normal((24, 64)), dtype=cupy.float32)
    y = cupy.asarray(rng.integers(0, 10, 24))
    pool = cupy.get_default_memory_pool()
    figures = []
    for _ in range(5):
        strategy.forward_backward(x, y)
        strategy.update(0.01)
        cupy.cuda.get_current_stream().synchronize()
        figures.append((pool.total_bytes(), pool.used_bytes()))
    strategy.close()
    assert len(set(figures[1:])) == 1, figures
