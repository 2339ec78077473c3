"""One pipeline stage of the MLP, its dense layers sliced over the tensor group.

Which layers are sliced, and how: dense layers pair up from the front as column -> activation ->
row, Megatron's MLP block, so each pair costs one sum in forward and one in backward and the
activation between them never leaves its rank. A last unpaired layer (784-4096-4096-10: the
4096 -> 10 output) stays whole on every rank: slicing it would add a sum of its (B, 4096) input
gradient per step to save a few thousand parameters. With --tp 1 every layer is whole.

The stage's local parameters (shards) live in one flat buffer and its gradients in another, as in
nn.Sequential, so the optimizer and the data-parallel all-reduce see one array per rank.
"""

import numpy as np

from mpitrain.nn.layers import weight_init
from mpitrain.parallel.layers import ColumnParallelLinear, Linear, RowParallelLinear
from mpitrain.parallel.mappings import TensorGroup


def layer_roles(n_dense: int, tp_size: int) -> list[str]:
    """'column', 'row' or 'whole' for each dense layer: pairs from the front, an odd last one whole."""
    if tp_size == 1:
        return ["whole"] * n_dense
    roles = ["column", "row"] * (n_dense // 2)
    return roles + ["whole"] * (n_dense % 2)


def parameter_names(widths: list[int]) -> list[str]:
    """'0/weight', '0/bias', '1/weight', ...: the names a data-parallel run saves, in layer order."""
    return [f"{i}/{kind}" for i in range(len(widths) - 1) for kind in ("weight", "bias")]


def full_shapes(widths: list[int]) -> dict[str, tuple[int, ...]]:
    """Unsliced shape of every parameter: weight (in, out), bias (out,)."""
    shapes = {}
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        shapes[f"{i}/weight"], shapes[f"{i}/bias"] = (n_in, n_out), (n_out,)
    return shapes


def initial_parameters(widths: list[int], activation: str, seed: int):
    """Yield (name, unsliced float64 array) in layer order, drawn exactly as nn.Sequential draws them,
    so any layout starts from the parameters of the one-process run."""
    rng = np.random.default_rng(seed)
    last = len(widths) - 2
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        yield f"{i}/weight", weight_init(rng, n_in, n_out, activation if i < last else "identity")
        yield f"{i}/bias", np.zeros(n_out)


def _activation_forward(xp, kind: str, x):
    """(y, saved): ReLU saves its mask (one byte per element), tanh its output."""
    if kind == "relu":
        y = xp.maximum(x, 0)
        return y, y > 0
    y = xp.tanh(x)
    return y, y


def _activation_backward(kind: str, dy, saved):
    return dy * saved if kind == "relu" else dy * (1 - saved * saved)


class StageModel:
    """Dense layers [first, stop) of the MLP `widths`, each sliced over `group` by its role.

    forward(x, micro) keeps what backward needs under the micro-batch's number, so several
    micro-batches can be in flight; backward(dy, micro) consumes it.
    """

    def __init__(self, widths, activation, layers: tuple[int, int], group: TensorGroup, xp=np,
                 dtype=np.float32, micro_batches: int = 1):
        self.widths, self.activation, self.xp, self.group = list(widths), activation, xp, group
        self.dtype = np.dtype(dtype)
        self.first, self.stop = layers
        n_dense = len(widths) - 1
        roles = layer_roles(n_dense, group.size)
        self.roles = roles[self.first:self.stop]
        self.dense = []
        for i, role in zip(range(self.first, self.stop), self.roles):
            n_in, n_out = widths[i], widths[i + 1]
            if role == "column":
                self.dense.append(ColumnParallelLinear(xp, n_in, n_out, group))
            elif role == "row":
                self.dense.append(RowParallelLinear(xp, n_in, n_out, group, input_is_parallel=True))
            else:
                self.dense.append(Linear(xp, n_in, n_out, group))
        # The model's last dense layer has no activation after it.
        self.activations = [activation if i < n_dense - 1 else None for i in range(self.first, self.stop)]

        stops = np.cumsum([layer.n_params for layer in self.dense]).tolist()
        self.params = xp.zeros(stops[-1], dtype=self.dtype)
        self.grads = xp.zeros_like(self.params)
        # Only micro-batching accumulates gradients, and only accumulation needs the scratch.
        largest = max(layer.weight_shape[0] * layer.weight_shape[1] for layer in self.dense)
        scratch = xp.empty(largest, dtype=self.dtype) if micro_batches > 1 else None
        for layer, start, stop in zip(self.dense, [0] + stops[:-1], stops):
            layer.bind(self.params[start:stop], self.grads[start:stop], scratch)

        self.saved: dict[int, list] = {}
        self.live_bytes = self.peak_bytes = 0
        self.fresh_grads = True

    # ------------------------------------------------------------------------ shapes

    @property
    def input_width(self) -> int:
        """Columns of this rank's stage input: the local rows of the first weight (a slice for a row layer)."""
        return self.dense[0].weight_shape[0]

    @property
    def output_width(self) -> int:
        """Columns of this rank's stage output: the local columns of the last weight (a slice for a
        column layer, whose output is never gathered here)."""
        return self.dense[-1].weight_shape[1]

    # ------------------------------------------------------------------------ forward and backward

    def forward(self, x, micro: int | None = None):
        """(B, input_width) -> (B, output_width); keeps activations under `micro` unless it is None."""
        saved = []
        for layer, kind in zip(self.dense, self.activations):
            x, layer_saved = layer.forward(x)
            act_saved = None
            if kind is not None:
                x, act_saved = _activation_forward(self.xp, kind, x)
            saved.append((layer_saved, act_saved))
        if micro is not None:
            self.saved[micro] = saved
            self.live_bytes += sum(a.nbytes for pair in saved for a in pair if a is not None)
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return x

    def start_step(self) -> None:
        """The next backward overwrites the gradients; later ones in the step add to them."""
        self.fresh_grads = True

    def backward(self, dy, micro: int):
        """dL/d(output) (B, output_width) -> dL/d(input), or None on the model's first layer.
        Gradients of the local shards are written (first micro-batch of a step) or added."""
        saved = self.saved.pop(micro)
        self.live_bytes -= sum(a.nbytes for pair in saved for a in pair if a is not None)
        for index in reversed(range(len(self.dense))):
            layer_saved, act_saved = saved[index]
            if act_saved is not None:
                dy = _activation_backward(self.activations[index], dy, act_saved)
            need_dx = self.first + index > 0
            dy = self.dense[index].backward(dy, layer_saved, need_dx=need_dx, accumulate=not self.fresh_grads)
        self.fresh_grads = False
        return dy

    # ------------------------------------------------------------------------ parameters

    def shards(self) -> list[tuple[str, tuple, object]]:
        """(name, index into the unsliced parameter, local view) for every parameter of this stage."""
        out = []
        for i, layer in zip(range(self.first, self.stop), self.dense):
            out += [(f"{i}/weight", layer.weight_index, layer.weight), (f"{i}/bias", (layer.bias_index,), layer.bias)]
        return out

    def load(self, named) -> None:
        """Copy this rank's shards out of (name, unsliced array-like) pairs: numpy arrays or h5py
        datasets (indexing a dataset reads only the shard's hyperslab)."""
        wanted = {name: (index, view) for name, index, view in self.shards()}
        for name, array in named:
            if name in wanted:
                index, view = wanted[name]
                view[...] = self.xp.asarray(np.asarray(array[index]), dtype=self.dtype)
