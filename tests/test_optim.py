"""SGD and Adam equal a plain reference over several steps, in place on the flat buffers; schedules."""

import math
import tracemalloc

import numpy as np
import pytest

from mpitrain.errors import MpitrainError
from mpitrain.nn.losses import SoftmaxCrossEntropy
from mpitrain.nn.model import Model
from mpitrain.optim import SGD, Adam, schedule
from gradcheck import host


N, STEPS = 50, 6
MAKERS = [
    lambda p, g: SGD(p, g, 0.1, momentum=0.9, weight_decay=0.01),
    lambda p, g: Adam(p, g, 0.1, weight_decay=0.01),
]


def problem(seed=0):
    """Initial parameters, one random gradient per step, and a varying learning rate per step."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(N), rng.standard_normal((STEPS, N)), rng.uniform(0.01, 0.1, STEPS)


def run(xp, make_optimizer, p0, gradients, lrs):
    params, grads = xp.asarray(p0.copy()), xp.zeros(N)
    optimizer = make_optimizer(params, grads)
    for g, lr in zip(gradients, lrs):
        grads[...] = xp.asarray(g)
        optimizer.step(lr)
        # The update reads the gradient but leaves it as backward wrote it.
        np.testing.assert_array_equal(host(grads), g)
    return host(params), optimizer


# ---------------------------------------------------------------------------- reference implementations


def reference_sgd(p, gradients, lrs, momentum, weight_decay):
    v = np.zeros_like(p)
    for g, lr in zip(gradients, lrs):
        g = g + weight_decay * p
        if momentum:
            v = momentum * v + g
            g = v
        p = p - lr * g
    return p


def reference_adam(p, gradients, lrs, beta1, beta2, eps, weight_decay):
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(gradients, lrs), start=1):
        g = g + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_sgd_matches_reference(xp, momentum, weight_decay):
    p0, gradients, lrs = problem()
    make = lambda p, g: SGD(p, g, lr=1.0, momentum=momentum, weight_decay=weight_decay)
    got, optimizer = run(xp, make, p0, gradients, lrs)
    expected = reference_sgd(p0, gradients, lrs, momentum, weight_decay)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
    assert optimizer.t == STEPS


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.9)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adam_matches_reference(xp, betas, weight_decay):
    p0, gradients, lrs = problem(1)
    make = lambda p, g: Adam(p, g, lr=1.0, betas=betas, eps=1e-8, weight_decay=weight_decay)
    got, _ = run(xp, make, p0, gradients, lrs)
    expected = reference_adam(p0, gradients, lrs, *betas, 1e-8, weight_decay)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("make", MAKERS, ids=["sgd", "adam"])
def test_blocks_give_the_bits_of_one_pass(make, monkeypatch):
    """The host update runs block by block for cache reuse; every entry sees the same operations."""
    from mpitrain import optim

    p0, gradients, lrs = problem(3)
    whole, optimizer = run(np, make, p0, gradients, lrs)
    assert optimizer.block == N
    monkeypatch.setattr(optim, "BLOCK", 7)
    blocked, optimizer = run(np, make, p0, gradients, lrs)
    assert optimizer.block == 7
    np.testing.assert_array_equal(blocked, whole)


def test_step_without_lr_uses_the_constructor_lr(xp):
    p0, gradients, _ = problem(2)
    default, _ = run(xp, lambda p, g: SGD(p, g, lr=0.03, momentum=0.9), p0, gradients, [None] * STEPS)
    passed, _ = run(xp, lambda p, g: SGD(p, g, lr=1.0, momentum=0.9), p0, gradients, [0.03] * STEPS)
    np.testing.assert_array_equal(default, passed)


# ---------------------------------------------------------------------------- state


@pytest.mark.parametrize("make", MAKERS, ids=["sgd", "adam"])
def test_state_round_trip_resumes_bit_identically(xp, make):
    p0, gradients, lrs = problem(3)
    straight, _ = run(xp, make, p0, gradients, lrs)

    half = STEPS // 2
    first, optimizer = run(xp, make, p0, gradients[:half], lrs[:half])
    state = optimizer.state()
    assert state["step"] == half
    assert all(isinstance(a, np.ndarray) for name, a in state.items() if name != "step")
    resumed, resumed_optimizer = run(xp, lambda p, g: _loaded(make(p, g), state), first, gradients[half:], lrs[half:])
    np.testing.assert_array_equal(resumed, straight)
    assert resumed_optimizer.t == STEPS


def _loaded(optimizer, state):
    optimizer.load_state(state)
    return optimizer


def test_load_state_checks_names_and_shapes(xp):
    optimizer = Adam(xp.zeros(N), xp.zeros(N), 0.1)
    state = optimizer.state()
    state["m"] = np.zeros(N + 1)
    with pytest.raises(MpitrainError, match=rf"'m': shape \({N + 1},\) but the parameters have \({N},\)"):
        optimizer.load_state(state)
    del state["v"]
    with pytest.raises(MpitrainError, match="expected"):
        optimizer.load_state(state)


# ---------------------------------------------------------------------------- no allocation per step


@pytest.mark.parametrize("make", MAKERS, ids=["sgd", "adam"])
def test_training_steps_keep_every_buffer(xp, make):
    model = Model([5, 7, 3], xp=xp, seed=0)
    optimizer = make(model.params, model.grads)
    rng = np.random.default_rng(0)
    x, labels = xp.asarray(rng.standard_normal((8, 5)), dtype=np.float32), xp.asarray(rng.integers(0, 3, 8))
    buffers = [model.params, model.grads, *optimizer.buffers.values()]
    views = [view for _, view in model.named_parameters()]
    start = host(model.params)
    loss = SoftmaxCrossEntropy(xp)
    for _ in range(3):
        loss.forward(model.forward(x), labels)
        model.backward(loss.backward(1 / 8))
        optimizer.step()
    assert all(a is b for a, b in zip(buffers, [model.params, model.grads, *optimizer.buffers.values()]))
    assert all(a is b for a, b in zip(views, [view for _, view in model.named_parameters()]))
    assert not np.array_equal(host(model.params), start)
    # The layers still compute with the (updated) flat buffer.
    np.testing.assert_array_equal(host(model.dense[0].weight).ravel(), host(model.params[: 5 * 7]))


@pytest.mark.parametrize("make", MAKERS, ids=["sgd", "adam"])
def test_step_allocates_no_parameter_sized_array(make):
    params, grads = np.ones(100_000), np.ones(100_000)
    optimizer = make(params, grads)
    optimizer.step()
    tracemalloc.start()
    optimizer.step()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < params.nbytes / 10


# ---------------------------------------------------------------------------- schedules


def test_warmup_is_linear_up_to_base_lr():
    base, warmup = 0.4, 5
    lrs = [schedule("constant", base, s, 100, warmup) for s in range(warmup + 3)]
    assert math.isclose(lrs[0], base / warmup)
    assert math.isclose(lrs[warmup - 1], base)
    assert np.allclose(np.diff(lrs[:warmup]), base / warmup)
    assert lrs[warmup:] == [base] * 3


def test_cosine_endpoints():
    base, total, warmup = 0.4, 110, 10
    assert math.isclose(schedule("cosine", base, warmup, total, warmup), base)
    assert math.isclose(schedule("cosine", base, warmup + (total - warmup) // 2, total, warmup), base / 2)
    assert schedule("cosine", base, total, total, warmup) == 0
    decay = [schedule("cosine", base, s, total, warmup) for s in range(warmup, total + 1)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert schedule("cosine", base, 0, total, 0) == base


def test_schedule_rejects_bad_arguments():
    with pytest.raises(MpitrainError, match="'exponential'"):
        schedule("exponential", 0.1, 0, 10, 0)
    with pytest.raises(MpitrainError, match="warm-up of 11 steps"):
        schedule("cosine", 0.1, 0, 10, 11)


@pytest.mark.parametrize("kind", ["cosine", "linear", "step", "plateau"])
def test_each_schedule_follows_its_closed_form(kind):
    """Every step's rate after the warm-up against the formula written out here, min_lr included."""
    base, floor, total, warmup, per_epoch, decay, scale = 0.4, 0.01, 50, 5, 7, 0.5, 0.25

    def expected(step):
        p = (step - warmup) / (total - warmup)
        return {"cosine": floor + (base - floor) * (1 + math.cos(math.pi * p)) / 2,
                "linear": base - (base - floor) * p,
                "step": max(floor, base * decay ** (step // per_epoch)),
                "plateau": max(floor, base * scale)}[kind]

    got = [schedule(kind, base, s, total, warmup, min_lr=floor, decay=decay, steps_per_epoch=per_epoch, scale=scale)
           for s in range(total + 1)]
    assert np.allclose(got[:warmup], base * np.arange(1, warmup + 1) / warmup)
    assert np.allclose(got[warmup:], [expected(s) for s in range(warmup, total + 1)], rtol=1e-12)
    assert min(got[warmup:]) >= floor and (kind == "plateau" or math.isclose(min(got[warmup:]), floor)), got
