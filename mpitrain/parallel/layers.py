"""Tensor-parallel dense layers, each forward next to its backward, communication by named pairs.

Y = X A + b with X (B, in), A (in, out), b (out,), over a tensor group of T ranks:

    ColumnParallelLinear  A = [A_1 .. A_T] by columns; rank t holds A_t (in, out_t) and b_t (out_t,)
                          and computes Y_t = X A_t + b_t, its column slice of Y.
    RowParallelLinear     A = [A_1; ..; A_T] by rows; rank t holds A_t (in_t, out) and all of b;
                          takes the column slice X_t and computes Y = sum_t X_t A_t + b (b added once,
                          after the sum).
    Linear                every rank holds all of A and b (used where slicing would cost a sum
                          without saving much, e.g. a 10-wide output layer); no communication.

Uneven widths are sharded unevenly, never refused: out_t (in_t) are the chunk sizes of
chunk_bounds(out, T), which differ by at most one column, and a width below T leaves some
ranks an empty slice, which is still correct (they contribute zero).

forward(x) returns (y, saved); backward(dy, saved, ...) returns dX. Keeping `saved` outside the
layer lets a pipeline stage hold several micro-batches in flight. Gradients of the local shard
are written into views of the stage's flat gradient buffer; with accumulate=True they are added
(micro-batches of one step), using a scratch buffer so no weight-sized array is allocated per call.
"""

from mpitrain.parallel.mappings import CopyToTP, GatherFromTP, ReduceFromTP, ScatterToTP, TensorGroup


class _Dense:
    """Shapes, flat-buffer binding and gradient writes shared by the three dense layers."""

    def __init__(self, xp, n_in: int, n_out: int, group: TensorGroup, weight_rows: slice, weight_cols: slice,
                 bias_cols: slice):
        self.xp, self.n_in, self.n_out, self.group = xp, n_in, n_out, group
        # The shard of the full A and b this rank holds: indices into the unsliced (in, out) and (out,).
        self.weight_index = (weight_rows, weight_cols)
        self.bias_index = bias_cols
        self.weight_shape = (len(range(n_in)[weight_rows]), len(range(n_out)[weight_cols]))
        self.bias_size = len(range(n_out)[bias_cols])
        self.weight = self.bias = self.grad_weight = self.grad_bias = self.scratch = None

    @property
    def n_params(self) -> int:
        """Parameters held on this rank (the shard, not the layer)."""
        return self.weight_shape[0] * self.weight_shape[1] + self.bias_size

    def bind(self, params, grads, scratch):
        """Carve the shard's weight then bias out of 1-D slices of length n_params; `scratch` is a
        1-D buffer of at least the weight's size to accumulate weight gradients in, or None when
        gradients are never accumulated."""
        n_w = self.weight_shape[0] * self.weight_shape[1]
        self.weight = params[:n_w].reshape(self.weight_shape)
        self.bias = params[n_w:]
        self.grad_weight = grads[:n_w].reshape(self.weight_shape)
        self.grad_bias = grads[n_w:]
        self.scratch = None if scratch is None else scratch[:n_w].reshape(self.weight_shape)

    def _write_grads(self, x, dy, accumulate: bool):
        """dA_local (+)= X_local^T dY_local, db_local (+)= sum_B dY_local."""
        if accumulate:
            self.xp.matmul(x.T, dy, out=self.scratch)
            self.grad_weight += self.scratch
            self.grad_bias += dy.sum(axis=0)
        else:
            self.xp.matmul(x.T, dy, out=self.grad_weight)
            self.xp.sum(dy, axis=0, out=self.grad_bias)


class ColumnParallelLinear(_Dense):
    """Y_t = X A_t + b_t. Input: CopyToTP (X is whole on every rank). Output: the slice Y_t, or with
    gather_output the whole Y via GatherFromTP."""

    def __init__(self, xp, n_in: int, n_out: int, group: TensorGroup, gather_output: bool = False):
        own = group.own(n_out)
        super().__init__(xp, n_in, n_out, group, slice(None), own, own)
        self.gather_output = gather_output

    def forward(self, x):
        x = CopyToTP.forward(x, self.group)
        y = self.xp.matmul(x, self.weight)
        y += self.bias
        if self.gather_output:
            y = GatherFromTP.forward(y, self.group, self.n_out)
        return y, x

    def backward(self, dy, x, need_dx: bool = True, accumulate: bool = False):
        """dA_t = X^T dY_t, db_t = sum_B dY_t; dX = sum over the group of dY_t A_t^T."""
        if self.gather_output:
            dy = GatherFromTP.backward(dy, self.group, self.n_out)
        self._write_grads(x, dy, accumulate)
        if not need_dx:
            return None
        return CopyToTP.backward(self.xp.matmul(dy, self.weight.T), self.group)


class RowParallelLinear(_Dense):
    """Y = sum_t X_t A_t + b. Input: the column slice X_t (input_is_parallel, straight from a column
    layer) or the whole X, sliced by ScatterToTP. Output: ReduceFromTP, then b added once."""

    def __init__(self, xp, n_in: int, n_out: int, group: TensorGroup, input_is_parallel: bool = True):
        super().__init__(xp, n_in, n_out, group, group.own(n_in), slice(None), slice(None))
        self.input_is_parallel = input_is_parallel

    def forward(self, x):
        if not self.input_is_parallel:
            x = ScatterToTP.forward(x, self.group, self.n_in)
        y = ReduceFromTP.forward(self.xp.matmul(x, self.weight), self.group)
        y += self.bias
        return y, x

    def backward(self, dy, x, need_dx: bool = True, accumulate: bool = False):
        """dA_t = X_t^T dY, db = sum_B dY (identical on every rank); dX_t = dY A_t^T."""
        dy = ReduceFromTP.backward(dy, self.group)
        self._write_grads(x, dy, accumulate)
        if not need_dx:
            return None
        dx = self.xp.matmul(dy, self.weight.T)
        if not self.input_is_parallel:
            dx = ScatterToTP.backward(dx, self.group, self.n_in)
        return dx


class Linear(_Dense):
    """Y = X A + b with all of A on every rank of the group: same input, same output, same gradients
    on every rank, so nothing is exchanged."""

    def __init__(self, xp, n_in: int, n_out: int, group: TensorGroup):
        super().__init__(xp, n_in, n_out, group, slice(None), slice(None), slice(None))

    def forward(self, x):
        y = self.xp.matmul(x, self.weight)
        y += self.bias
        return y, x

    def backward(self, dy, x, need_dx: bool = True, accumulate: bool = False):
        self._write_grads(x, dy, accumulate)
        return self.xp.matmul(dy, self.weight.T) if need_dx else None

