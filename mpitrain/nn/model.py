"""The model: an MLP (or one pipeline stage of it, sliced over a tensor group) in flat buffers.

One class serves every layout. With no group and all layers it is the whole model of a
one-process or data-parallel run; under --tp T its dense layers pair up from the front as
column -> activation -> row (Megatron's MLP block: one sum of activations forward, one backward,
and the activation between them never leaves its rank), a last unpaired layer staying whole
(784-4096-4096-10: slicing the 4096 -> 10 output would add a sum of its (B, 4096) input gradient
per step to save a few thousand parameters); under --pp P it holds the dense layers [first, stop)
of its stage.

Layout of `params` (and, entry for entry, `grads`): this rank's layer-0 weight (in, out) row-major,
layer-0 bias, layer-1 weight, ... Every layer works on views into it, so a step's gradients are
summed as one buffer (or as the per-layer ranges of `layer_grad_slices`) with no packing copy, and
the optimizer updates every parameter with a handful of vector operations.

Parameters are named as the unsliced model names them ('0/weight' (in, out), '0/bias', ...);
`shards()` says which part of each this rank holds, which is all a checkpoint or --init-from
needs to move parameters between layouts.
"""

import numpy as np

from mpitrain.errors import MpitrainError
from mpitrain.nn.layers import ACTIVATIONS, Linear, weight_init
from mpitrain.parallel.layers import ColumnParallelLinear, RowParallelLinear
from mpitrain.parallel.mappings import TensorGroup
from mpitrain.trace import TRACE


def parse_widths(spec: str) -> list[int]:
    """'784-1024-10' -> [784, 1024, 10]: input width, hidden widths, output width, all positive."""
    parts = spec.split("-")
    if len(parts) < 2:
        raise MpitrainError(f"--model '{spec}': expected widths joined by '-', like 784-1024-10")
    for part in parts:
        if not part.isdecimal() or int(part) == 0:
            raise MpitrainError(f"--model '{spec}': width '{part}' is not a positive integer")
    return [int(part) for part in parts]


def parameter_names(widths: list[int]) -> list[str]:
    """'0/weight', '0/bias', '1/weight', ...: every parameter's name, in layer order."""
    return [f"{i}/{kind}" for i in range(len(widths) - 1) for kind in ("weight", "bias")]


def full_shapes(widths: list[int]) -> dict[str, tuple[int, ...]]:
    """Unsliced shape of every parameter: weight (in, out), bias (out,)."""
    shapes = {}
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        shapes[f"{i}/weight"], shapes[f"{i}/bias"] = (n_in, n_out), (n_out,)
    return shapes


def flat_offsets(widths: list[int]) -> dict[str, int]:
    """Where each parameter starts in the flat buffer of the whole model (the parameter server's
    ranges and a checkpoint's flat view are cut from this layout)."""
    offsets, start = {}, 0
    for name, shape in full_shapes(widths).items():
        offsets[name] = start
        start += int(np.prod(shape))
    return offsets


def initial_parameters(widths: list[int], activation: str, seed: int):
    """Yield (name, unsliced float64 array) in layer order from one Generator, so every layout
    (and CPU and GPU) starts from the parameters of the one-process run."""
    rng = np.random.default_rng(seed)
    last = len(widths) - 2
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        yield f"{i}/weight", weight_init(rng, n_in, n_out, activation if i < last else "identity")
        yield f"{i}/bias", np.zeros(n_out)


def layer_roles(n_dense: int, tp_size: int) -> list[str]:
    """'column', 'row' or 'whole' for each dense layer: pairs from the front, an odd last one whole."""
    if tp_size == 1:
        return ["whole"] * n_dense
    return ["column", "row"] * (n_dense // 2) + ["whole"] * (n_dense % 2)


class Model:
    """Dense layers [first, stop) of the MLP `widths` (all of them by default), each sliced over
    `group` by its role (whole without a group), activation between layers, none after the last.

    forward(x, micro) keeps what backward needs under the micro-batch's number, so several
    micro-batches can be in flight; backward(dy, micro) consumes it. Parameters start as
    initial_parameters(widths, activation, seed) whatever the layout.
    """

    def __init__(self, widths, activation="relu", xp=np, dtype=np.float32, seed=0,
                 group: TensorGroup | None = None, layers: tuple[int, int] | None = None, micro_batches: int = 1):
        if activation not in ACTIVATIONS:
            raise MpitrainError(f"activation '{activation}': expected one of {', '.join(ACTIVATIONS)}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise MpitrainError(f"dtype '{self.dtype}': expected float32 or float64")
        if len(widths) < 2 or any(w <= 0 for w in widths):
            raise MpitrainError(f"widths {list(widths)}: need at least two positive widths")
        self.widths, self.activation, self.xp = list(widths), activation, xp
        self.group = group if group is not None else TensorGroup(None, xp)
        n_dense = len(widths) - 1
        self.first, self.stop = layers if layers is not None else (0, n_dense)
        roles = layer_roles(n_dense, self.group.size)[self.first:self.stop]
        self.dense = []
        for i, role in zip(range(self.first, self.stop), roles):
            n_in, n_out = widths[i], widths[i + 1]
            if role == "column":
                self.dense.append(ColumnParallelLinear(xp, n_in, n_out, self.group))
            elif role == "row":
                self.dense.append(RowParallelLinear(xp, n_in, n_out, self.group, input_is_parallel=True))
            else:
                self.dense.append(Linear(xp, n_in, n_out))
        self.activations = [ACTIVATIONS[activation] if i < n_dense - 1 else None for i in range(self.first, self.stop)]

        stops = np.cumsum([layer.n_params for layer in self.dense]).tolist()
        self._slices = list(zip([0] + stops[:-1], stops))
        self.params = xp.zeros(stops[-1], dtype=self.dtype)
        self.grads = xp.zeros_like(self.params)
        # Only micro-batching accumulates gradients, and only accumulation needs the scratch.
        largest = max(layer.weight_shape[0] * layer.weight_shape[1] for layer in self.dense)
        scratch = xp.empty(largest, dtype=self.dtype) if micro_batches > 1 else None
        for layer, (start, stop) in zip(self.dense, self._slices):
            layer.bind(self.params[start:stop], self.grads[start:stop], scratch)
        self.saved: dict[int, list] = {}
        self.live_bytes = self.peak_bytes = 0
        self._buffers: dict[tuple, object] = {}  # activation buffers reused step to step (see forward)
        self._slots: dict[int, int] = {}  # micro-batch in flight -> its set of forward buffers
        self.load(initial_parameters(self.widths, activation, seed))

    # ------------------------------------------------------------------------ shapes

    @property
    def input_width(self) -> int:
        """Columns of this rank's input: the local rows of the first weight (a slice for a row layer)."""
        return self.dense[0].weight_shape[0]

    @property
    def output_width(self) -> int:
        """Columns of this rank's output: the local columns of the last weight (a slice for a column
        layer, whose output is never gathered here)."""
        return self.dense[-1].weight_shape[1]

    def layer_grad_slices(self) -> list[tuple[int, int]]:
        """(start, stop) of each dense layer's weight+bias in `grads` (and `params`), in forward order."""
        return list(self._slices)

    def bind_grads(self, views, before_piece=None, after_piece=None) -> None:
        """Point dense layer i's gradients at views[i] (1-D, its n_params entries, or a list of pieces
        of rows: Linear.bind_pieces, with the hooks) and drop the flat gradient buffer: --zero 2,
        whose two staging slots hold a bucket each (comm/buckets.py). Gradients no longer
        accumulate over micro-batches (config refuses --zero 2 with them)."""
        for layer, (start, stop), view in zip(self.dense, self._slices, views):
            if isinstance(view, list):
                layer.bind_pieces(self.params[start:stop], view, before_piece, after_piece)
            else:
                layer.bind(self.params[start:stop], view, None)
        self.grads = None

    # ------------------------------------------------------------------------ forward and backward

    def forward(self, x, micro: int | None = 0, before_layer=None):
        """(B, input_width) -> (B, output_width); keeps what backward needs under `micro`, or
        nothing with micro=None (evaluation). before_layer(i) runs before local dense layer i
        (--zero: wait for that layer's parameters, whose all-gather may still be in flight).

        Each layer's output lands in a buffer kept from step to step: one set per micro-batch in
        flight (1F1B keeps fewer in flight than GPipe), and the activation works in place on it, so
        after the first step forward allocates nothing. So the returned array is overwritten by the
        next forward that takes the same set (copy it to keep it). A stage's output for the next
        stage is the exception: the link holds it until its send completes, so it is new per call."""
        slot = "eval" if micro is None else self._take_slot(micro)
        handed_on = self.stop < len(self.widths) - 1
        saved = []
        for index, (layer, activation) in enumerate(zip(self.dense, self.activations)):
            if TRACE.active:
                started = TRACE.now()
            if before_layer is not None:
                before_layer(index)
            last = index == len(self.dense) - 1
            out = None if last and handed_on else self._buffer(("forward", slot, index), (len(x), layer.weight_shape[1]))
            x, layer_saved = layer.forward(x, out)
            act_saved = None
            if activation is not None:
                x, act_saved = activation.forward(self.xp, x, in_place=True)
            saved.append((layer_saved, act_saved))
            if TRACE.active:
                TRACE.span("compute", f"forward {self.first + index}", started, layer=self.first + index, micro=micro)
        if micro is not None:
            self.saved[micro] = saved
            self.live_bytes += _distinct_bytes(saved)
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return x

    def backward(self, dy, micro: int = 0, accumulate: bool = False, on_layer_done=None):
        """dL/d(output) (B, output_width) -> dL/d(input), or None on the model's first layer.

        Gradients of the local shards are written, or added with accumulate=True (the later
        micro-batches of a step). on_layer_done(i) runs as soon as local dense layer i is done,
        last layer first, so its gradient sum can start while earlier layers still compute.
        The activations' backward overwrites dy; input gradients between layers go to reused
        buffers, and the one handed to the previous stage is new (as forward's output is).
        """
        saved = self.saved.pop(micro)
        self._slots.pop(micro)
        self.live_bytes -= _distinct_bytes(saved)
        for index in reversed(range(len(self.dense))):
            if TRACE.active:
                started = TRACE.now()
            layer_saved, act_saved = saved[index]
            if act_saved is not None:
                activation = self.activations[index]
                scratch = self._buffer(("scratch", index), dy.shape, activation.scratch_dtype or self.dtype)
                dy = activation.backward(dy, act_saved, scratch, self.xp)
            layer = self.dense[index]
            need_dx = self.first + index > 0
            out = self._buffer(("input grad", index), (len(dy), layer.weight_shape[0])) if index > 0 else None
            dy = layer.backward(dy, layer_saved, need_dx=need_dx, accumulate=accumulate, out=out)
            if TRACE.active:
                TRACE.span("compute", f"backward {self.first + index}", started, layer=self.first + index, micro=micro)
            if on_layer_done is not None:
                on_layer_done(index)
        return dy

    def _take_slot(self, micro: int) -> int:
        """The lowest set of forward buffers no other micro-batch in flight holds, now held by
        `micro` (a forward repeated without its backward takes its own set again)."""
        held = {slot for other, slot in self._slots.items() if other != micro}
        self._slots[micro] = next(slot for slot in range(len(held) + 1) if slot not in held)
        return self._slots[micro]

    def _buffer(self, key, shape, dtype=None):
        """The buffer kept under `key`, made (again) when missing or of another shape or dtype."""
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._buffers[key] = self.xp.empty(shape, dtype=dtype)
        return buf

    # ------------------------------------------------------------------------ parameters

    def shards(self) -> list[tuple[str, tuple, object, tuple[int, int]]]:
        """(name, index into the unsliced parameter, local view, [start, stop) in `params`) for every
        parameter this rank holds, in flat-buffer order."""
        out = []
        for i, layer, (start, _) in zip(range(self.first, self.stop), self.dense, self._slices):
            n_w = layer.weight.size
            out.append((f"{i}/weight", layer.weight_index, layer.weight, (start, start + n_w)))
            out.append((f"{i}/bias", (layer.bias_index,), layer.bias, (start + n_w, start + layer.n_params)))
        return out

    def named_parameters(self):
        """[("0/weight", local view), ("0/bias", ...), ...] in flat-buffer order."""
        return [(name, view) for name, _, view, _ in self.shards()]

    def state(self) -> dict:
        """Host numpy copies of this rank's parameters (all of them for a whole model)."""
        return {name: _host_copy(view) for name, view in self.named_parameters()}

    def load(self, named) -> None:
        """Copy this rank's shards out of (name, unsliced array-like) pairs: numpy arrays or h5py
        datasets (indexing a dataset reads only the shard's hyperslab). Names not held are skipped."""
        wanted = {name: (index, view) for name, index, view, _ in self.shards()}
        for name, array in named:
            if name in wanted:
                index, view = wanted[name]
                view[...] = self.xp.asarray(np.asarray(array[index]), dtype=self.dtype)

    def load_state(self, state: dict) -> None:
        """Copy {name: unsliced host array} into the parameters; every name and shape is checked first."""
        shapes = {name: shape for name, shape in full_shapes(self.widths).items()
                  if name in dict(self.named_parameters())}
        missing, unexpected = sorted(shapes.keys() - state.keys()), sorted(state.keys() - shapes.keys())
        if missing or unexpected:
            raise MpitrainError(f"model state: missing parameters {missing}, unexpected {unexpected}")
        for name, shape in shapes.items():
            if tuple(np.shape(state[name])) != shape:
                raise MpitrainError(f"parameter '{name}': state has shape {tuple(np.shape(state[name]))} "
                                    f"but the model has {shape}")
        self.load(state.items())


def _distinct_bytes(saved) -> int:
    """Bytes of the arrays kept for backward, each once (an activation saves the array the next layer keeps)."""
    arrays = {id(a): a for pair in saved for a in pair if a is not None}
    return sum(a.nbytes for a in arrays.values())


def _host_copy(a) -> np.ndarray:
    """A numpy copy of a numpy or cupy array (cupy's .get() copies device to host)."""
    return a.get() if hasattr(a, "get") else np.array(a)
