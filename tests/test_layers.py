"""Linear, ReLU and Tanh: analytic backward equals central finite differences in float64."""

import numpy as np
import pytest

from mpitrain.nn.layers import Linear, ReLU, Tanh, weight_init
from gradcheck import numeric_grad, rel_error


def test_linear_gradients(xp):
    rng = np.random.default_rng(0)
    layer = Linear(xp, 4, 3)
    params = xp.asarray(rng.standard_normal(layer.n_params))
    grads = xp.zeros_like(params)
    layer.bind(params, grads)
    x = xp.asarray(rng.standard_normal((5, 4)))
    # L = sum(Y * R) for a fixed random R, so dL/dY = R exercises every output.
    r = xp.asarray(rng.standard_normal((5, 3)))

    def loss():
        return float(xp.sum(layer.forward(x)[0] * r))

    _, saved = layer.forward(x)
    dx = layer.backward(r, saved)
    assert layer.weight.shape == (4, 3) and layer.bias.shape == (3,)
    assert rel_error(layer.grad_weight, numeric_grad(loss, layer.weight)) < 1e-6
    assert rel_error(layer.grad_bias, numeric_grad(loss, layer.bias)) < 1e-6
    assert rel_error(dx, numeric_grad(loss, x)) < 1e-6
    assert layer.backward(r, saved, need_dx=False) is None


@pytest.mark.parametrize("activation", [ReLU, Tanh])
def test_activation_gradients(xp, activation):
    rng = np.random.default_rng(1)
    # Keep ReLU inputs well away from its kink at 0, where finite differences are meaningless.
    x_host = rng.uniform(0.1, 2.0, size=(6, 5)) * rng.choice([-1.0, 1.0], size=(6, 5))
    x = xp.asarray(x_host)
    r = xp.asarray(rng.standard_normal((6, 5)))
    def loss():
        return float(xp.sum(activation.forward(xp, x)[0] * r))

    _, saved = activation.forward(xp, x)
    dx = activation.backward(r, saved)
    assert rel_error(dx, numeric_grad(loss, x)) < 1e-6


def test_weight_init_scales():
    rng = np.random.default_rng(2)
    fan_in, fan_out = 400, 300
    he = weight_init(rng, fan_in, fan_out, "relu")
    assert he.shape == (fan_in, fan_out)
    assert abs(he.std() / np.sqrt(2 / fan_in) - 1) < 0.02
    glorot = weight_init(rng, fan_in, fan_out, "tanh")
    limit = np.sqrt(6 / (fan_in + fan_out))
    assert np.abs(glorot).max() <= limit
    # U(-a, a) has standard deviation a / sqrt(3).
    assert abs(glorot.std() / (limit / np.sqrt(3)) - 1) < 0.02
