"""Dense layer and activations, each forward next to its backward.

Shapes: a batch is (B, features). Every layer caches what its backward needs during forward, so call
forward then backward once per step. `xp` is the numpy or cupy module; only API common to both is used.
"""

import numpy as np


def weight_init(rng: np.random.Generator, fan_in: int, fan_out: int, kind: str) -> np.ndarray:
    """Host float64 (fan_in, fan_out) weights for a layer followed by `kind`.

    relu: He normal, W ~ N(0, 2/fan_in), keeps the activation variance constant through ReLUs.
    tanh / identity: Glorot uniform, W ~ U(-a, a) with a = sqrt(6/(fan_in+fan_out)).
    Drawn on the host so CPU and GPU runs with the same seed start bit-identical.
    """
    if kind == "relu":
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_in, fan_out))
    if kind in ("tanh", "identity"):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, size=(fan_in, fan_out))
    raise ValueError(f"no weight init for activation {kind!r}")


class Linear:
    """Y = X W + b with X (B, in), W (in, out), b (out,).

    W, b and their gradients are views into the model's flat buffers (see `bind`), so the optimizer
    and the gradient all-reduce see every layer as one contiguous array.
    """

    def __init__(self, xp, n_in: int, n_out: int):
        self.xp = xp
        self.n_in, self.n_out = n_in, n_out
        self.weight = self.bias = self.grad_weight = self.grad_bias = None

    @staticmethod
    def n_params(n_in: int, n_out: int) -> int:
        return n_in * n_out + n_out

    def bind(self, params, grads):
        """Carve W, b (and dW, db) out of 1-D slices of length n_params: weight first, then bias."""
        n_w = self.n_in * self.n_out
        self.weight = params[:n_w].reshape(self.n_in, self.n_out)
        self.bias = params[n_w:]
        self.grad_weight = grads[:n_w].reshape(self.n_in, self.n_out)
        self.grad_bias = grads[n_w:]

    def forward(self, x):
        self.x = x
        y = self.xp.matmul(x, self.weight)
        y += self.bias
        return y

    def backward(self, dy, need_dx: bool = True):
        """dW = X^T dY and db = sum_B dY, written into the grad views; returns dX = dY W^T.

        need_dx=False skips dX for the first layer, whose input is data: that is a third of its backward.
        """
        self.xp.matmul(self.x.T, dy, out=self.grad_weight)
        self.xp.sum(dy, axis=0, out=self.grad_bias)
        return self.xp.matmul(dy, self.weight.T) if need_dx else None


class ReLU:
    """y = max(x, 0); dx = dy where x > 0, else 0."""

    def __init__(self, xp):
        self.xp = xp

    def forward(self, x):
        self.mask = x > 0
        return self.xp.maximum(x, 0)

    def backward(self, dy):
        return dy * self.mask


class Tanh:
    """y = tanh(x); dx = dy (1 - y^2), from the cached output so backward needs no second tanh."""

    def __init__(self, xp):
        self.xp = xp

    def forward(self, x):
        self.y = self.xp.tanh(x)
        return self.y

    def backward(self, dy):
        return dy * (1 - self.y * self.y)
