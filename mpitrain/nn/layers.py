"""The dense layer and the activations, each forward next to its backward.

Shapes: a batch is (B, features). forward returns (y, saved) and backward takes `saved` back, so
the caller decides how long what backward needs is kept: a pipeline stage keeps several
micro-batches in flight, evaluation keeps nothing. `xp` is the numpy or cupy module; only API
common to both is used.
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
    """Y = X A + b with X (B, in), A (in, out), b (out,), all of A and b on this rank.

    The tensor-parallel layers (parallel/layers.py) are this layer holding a slice of A and b:
    `weight_index` and `bias_index` say which part of the unsliced (in, out) and (out,) arrays
    this rank holds (all of them here). A, b and their gradients are views into the model's flat
    buffers (see `bind`), so the optimizer and the gradient all-reduce see one contiguous array.
    """

    def __init__(self, xp, n_in: int, n_out: int, weight_rows: slice = slice(None),
                 weight_cols: slice = slice(None), bias_cols: slice = slice(None)):
        self.xp, self.n_in, self.n_out = xp, n_in, n_out
        self.weight_index = (weight_rows, weight_cols)
        self.bias_index = bias_cols
        self.weight_shape = (len(range(n_in)[weight_rows]), len(range(n_out)[weight_cols]))
        self.bias_size = len(range(n_out)[bias_cols])
        self.weight = self.bias = self.grad_weight = self.grad_bias = self.scratch = None
        self.grad_pieces, self.piece_hooks = None, None

    @property
    def n_params(self) -> int:
        """Parameters held on this rank: weight then bias, in the flat buffer."""
        return self.weight_shape[0] * self.weight_shape[1] + self.bias_size

    def bind(self, params, grads, scratch=None):
        """Carve A then b out of 1-D slices of length n_params; `scratch` is a 1-D buffer of at
        least A's size to accumulate weight gradients in, or None when they never accumulate."""
        n_w = self.weight_shape[0] * self.weight_shape[1]
        self.weight = params[:n_w].reshape(self.weight_shape)
        self.bias = params[n_w:]
        self.grad_weight = grads[:n_w].reshape(self.weight_shape)
        self.grad_bias = grads[n_w:]
        self.scratch = None if scratch is None else scratch[:n_w].reshape(self.weight_shape)
        self.grad_pieces = self.piece_hooks = None

    def bind_pieces(self, params, pieces, before, after):
        """Carve A and b out of `params`, and write the gradient piece by piece (--zero 2,
        comm/buckets.py split_layers): pieces are (first row, stop row, 1-D view, key) in the order
        to write them, the bias being row `in` (one more row of the flat layout); before(key) runs
        before a piece is written, after(key) once it is."""
        n_w = self.weight_shape[0] * self.weight_shape[1]
        self.weight, self.bias = params[:n_w].reshape(self.weight_shape), params[n_w:]
        self.grad_weight = self.grad_bias = self.scratch = None
        self.grad_pieces, self.piece_hooks = pieces, (before, after)

    def write_grads(self, x, dy, accumulate: bool):
        """dA (+)= X^T dY, db (+)= sum_B dY; accumulating (micro-batches of one step) goes through
        the scratch buffer, so no weight-sized array is allocated per call. Bound in pieces
        (bind_pieces), rows [r0, r1) of dA are X[:, r0:r1]^T dY, one product per piece."""
        if self.grad_pieces is not None:
            rows, cols = self.weight_shape
            before, after = self.piece_hooks
            for first, stop, view, key in self.grad_pieces:
                before(key)
                weight_rows = min(stop, rows) - first
                if weight_rows > 0:
                    self.xp.matmul(x[:, first:first + weight_rows].T, dy,
                                   out=view[:weight_rows * cols].reshape(weight_rows, cols))
                if stop > rows:
                    self.xp.sum(dy, axis=0, out=view[weight_rows * cols:])
                after(key)
        elif accumulate:
            self.xp.matmul(x.T, dy, out=self.scratch)
            self.grad_weight += self.scratch
            self.grad_bias += dy.sum(axis=0)
        else:
            self.xp.matmul(x.T, dy, out=self.grad_weight)
            self.xp.sum(dy, axis=0, out=self.grad_bias)

    def forward(self, x, out=None):
        """(B, in) -> ((B, out), saved); `out`: a (B, out) buffer to write Y into, or None for a new one."""
        y = self.xp.matmul(x, self.weight, out=out)
        y += self.bias
        return y, x

    def backward(self, dy, x, need_dx: bool = True, accumulate: bool = False, out=None):
        """Write dA, db; return dX = dY A^T (into `out` when given), or None with need_dx=False (the
        first layer, whose input is data: a third of its backward)."""
        self.write_grads(x, dy, accumulate)
        return self.xp.matmul(dy, self.weight.T, out=out) if need_dx else None


class ReLU:
    """y = max(x, 0); dx = dy where y > 0, else 0. Saves y, which the next layer keeps anyway as its
    input, so the activation adds no memory of its own."""

    # The mask is kept in the activations' dtype: multiplying by a float 0/1 took a third of the time
    # of multiplying by a bool (numpy converts the bool operand on the fly), with the same bits.
    scratch_dtype = None

    @staticmethod
    def forward(xp, x, in_place: bool = False):
        """y, and what backward needs; in_place overwrites x (a buffer the caller owns)."""
        y = xp.maximum(x, 0, out=x if in_place else None)
        return y, y

    @staticmethod
    def backward(dy, y, scratch=None, xp=None):
        """dx; with `scratch` (an array of dy's shape and dtype) dy is overwritten and returned instead."""
        if scratch is None:
            return dy * (y > 0)
        xp.greater(y, 0, out=scratch)
        dy *= scratch
        return dy


class Tanh:
    """y = tanh(x); dx = dy (1 - y^2), from the saved output so backward needs no second tanh."""

    scratch_dtype = None  # the activations' own

    @staticmethod
    def forward(xp, x, in_place: bool = False):
        y = xp.tanh(x, out=x if in_place else None)
        return y, y

    @staticmethod
    def backward(dy, y, scratch=None, xp=None):
        """dx; with `scratch` (an array of dy's shape and dtype) dy is overwritten and returned instead."""
        if scratch is None:
            return dy * (1 - y * y)
        xp.multiply(y, y, out=scratch)
        xp.subtract(1, scratch, out=scratch)
        dy *= scratch
        return dy


ACTIVATIONS = {"relu": ReLU, "tanh": Tanh}
