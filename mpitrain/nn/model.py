"""A multilayer perceptron whose parameters and gradients each live in ONE flat contiguous array.

Layout of `params` (and, entry for entry, `grads`): layer 0 weight (in, out) row-major, layer 0 bias,
layer 1 weight, ... Every layer works on views into it, so a whole step's gradients are all-reduced
as one buffer (or as the per-layer ranges of `layer_grad_slices`) with no packing copy, and the
optimizer updates every parameter with a handful of vector operations.
"""

import numpy as np

from mpitrain.errors import MpitrainError
from mpitrain.nn.layers import Linear, ReLU, Tanh, weight_init

ACTIVATIONS = {"relu": ReLU, "tanh": Tanh}


def parse_widths(spec: str) -> list[int]:
    """'784-1024-10' -> [784, 1024, 10]: input width, hidden widths, output width, all positive."""
    parts = spec.split("-")
    if len(parts) < 2:
        raise MpitrainError(f"--model '{spec}': expected widths joined by '-', like 784-1024-10")
    for part in parts:
        if not part.isdecimal() or int(part) == 0:
            raise MpitrainError(f"--model '{spec}': width '{part}' is not a positive integer")
    return [int(part) for part in parts]


def _host_copy(a) -> np.ndarray:
    """A numpy copy of a numpy or cupy array (cupy's .get() copies device to host)."""
    return a.get() if hasattr(a, "get") else np.array(a)


class Sequential:
    """Linear, act, Linear, act, ..., Linear: widths[0] inputs, widths[-1] outputs, no final activation."""

    def __init__(self, widths, activation="relu", xp=np, dtype=np.float32, seed=0):
        if activation not in ACTIVATIONS:
            raise MpitrainError(f"activation '{activation}': expected one of {', '.join(ACTIVATIONS)}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise MpitrainError(f"dtype '{self.dtype}': expected float32 or float64")
        if len(widths) < 2 or any(w <= 0 for w in widths):
            raise MpitrainError(f"widths {list(widths)}: need at least two positive widths")
        self.xp = xp
        self.widths = list(widths)
        self.dense = [Linear(xp, n_in, n_out) for n_in, n_out in zip(widths[:-1], widths[1:])]
        self.layers = [self.dense[0]]
        for layer in self.dense[1:]:
            self.layers += [ACTIVATIONS[activation](xp), layer]

        stops = np.cumsum([Linear.n_params(layer.n_in, layer.n_out) for layer in self.dense]).tolist()
        self._slices = list(zip([0] + stops[:-1], stops))

        # Initialise on the host from one Generator, in layer order, then move once: the same seed
        # gives bit-identical parameters on CPU and GPU.
        rng = np.random.default_rng(seed)
        host = np.zeros(stops[-1], dtype=self.dtype)
        for i, (layer, (start, _)) in enumerate(zip(self.dense, self._slices)):
            kind = activation if i < len(self.dense) - 1 else "identity"
            w = weight_init(rng, layer.n_in, layer.n_out, kind)
            host[start:start + w.size] = w.ravel()
        self.params = xp.asarray(host)
        self.grads = xp.zeros_like(self.params)
        for layer, (start, stop) in zip(self.dense, self._slices):
            layer.bind(self.params[start:stop], self.grads[start:stop])

    def forward(self, x):
        """(B, widths[0]) -> (B, widths[-1])."""
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dout, on_layer_done=None):
        """Overwrite all of `grads` from dL/doutput (B, widths[-1]); nothing accumulates across steps.

        on_layer_done(i) runs as soon as dense layer i's gradients are final, last layer first, so a
        caller can start all-reducing layer_grad_slices()[i] while earlier layers are still computing.
        """
        dense_index = len(self.dense)
        for layer in reversed(self.layers):
            if isinstance(layer, Linear):
                dense_index -= 1
                dout = layer.backward(dout, need_dx=dense_index > 0)
                if on_layer_done is not None:
                    on_layer_done(dense_index)
            else:
                dout = layer.backward(dout)

    def layer_grad_slices(self) -> list[tuple[int, int]]:
        """(start, stop) of each dense layer's weight+bias in `grads` (and `params`), in forward order."""
        return list(self._slices)

    def named_parameters(self):
        """[("0/weight", (in, out) view), ("0/bias", (out,) view), ("1/weight", ...), ...]."""
        named = []
        for i, layer in enumerate(self.dense):
            named += [(f"{i}/weight", layer.weight), (f"{i}/bias", layer.bias)]
        return named

    def state(self) -> dict:
        """Host numpy copies of every parameter, keyed as in named_parameters()."""
        return {name: _host_copy(view) for name, view in self.named_parameters()}

    def load_state(self, state: dict):
        """Copy host arrays into the parameters; every name and shape is checked before any write."""
        named = dict(self.named_parameters())
        missing = sorted(named.keys() - state.keys())
        unexpected = sorted(state.keys() - named.keys())
        if missing or unexpected:
            raise MpitrainError(f"model state: missing parameters {missing}, unexpected {unexpected}")
        for name, view in named.items():
            if tuple(np.shape(state[name])) != tuple(view.shape):
                raise MpitrainError(
                    f"parameter '{name}': state has shape {tuple(np.shape(state[name]))} "
                    f"but the model has {tuple(view.shape)}"
                )
        for name, view in named.items():
            view[...] = self.xp.asarray(state[name], dtype=self.dtype)
