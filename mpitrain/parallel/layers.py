"""Tensor-parallel dense layers: nn.layers.Linear holding a slice of A, with its named exchanges.

Y = X A + b with X (B, in), A (in, out), b (out,), over a tensor group of T ranks:

    ColumnParallelLinear  A = [A_1 .. A_T] by columns; rank t holds A_t (in, out_t) and b_t (out_t,)
                          and computes Y_t = X A_t + b_t, its column slice of Y.
    RowParallelLinear     A = [A_1; ..; A_T] by rows; rank t holds A_t (in_t, out) and all of b;
                          takes the column slice X_t and computes Y = sum_t X_t A_t + b (b added once,
                          after the sum).

A layer kept whole on every rank of the group (e.g. a 10-wide output layer, where slicing would
cost a sum without saving much) is plain nn.layers.Linear: same input, output and gradients on
every rank, nothing exchanged.

Uneven widths are sharded unevenly, never refused: out_t (in_t) are the chunk sizes of
chunk_bounds(out, T), which differ by at most one column, and a width below T leaves some
ranks an empty slice, which is still correct (they contribute zero).
"""

from mpitrain.nn.layers import Linear
from mpitrain.parallel.mappings import CopyToTP, GatherFromTP, ReduceFromTP, ScatterToTP, TensorGroup


class ColumnParallelLinear(Linear):
    """Y_t = X A_t + b_t. Input: CopyToTP (X is whole on every rank). Output: the slice Y_t, or with
    gather_output the whole Y via GatherFromTP."""

    def __init__(self, xp, n_in: int, n_out: int, group: TensorGroup, gather_output: bool = False):
        own = group.own(n_out)
        super().__init__(xp, n_in, n_out, slice(None), own, own)
        self.group, self.gather_output = group, gather_output

    def forward(self, x, out=None):
        x = CopyToTP.forward(x, self.group)
        y = self.xp.matmul(x, self.weight, out=out)
        y += self.bias
        if self.gather_output:
            y = GatherFromTP.forward(y, self.group, self.n_out)
        return y, x

    def backward(self, dy, x, need_dx: bool = True, accumulate: bool = False, out=None):
        """dA_t = X^T dY_t, db_t = sum_B dY_t; dX = sum over the group of dY_t A_t^T."""
        if self.gather_output:
            dy = GatherFromTP.backward(dy, self.group, self.n_out)
        self.write_grads(x, dy, accumulate)
        if not need_dx:
            return None
        return CopyToTP.backward(self.xp.matmul(dy, self.weight.T, out=out), self.group)


class RowParallelLinear(Linear):
    """Y = sum_t X_t A_t + b. Input: the column slice X_t (input_is_parallel, straight from a column
    layer) or the whole X, sliced by ScatterToTP. Output: ReduceFromTP, then b added once."""

    def __init__(self, xp, n_in: int, n_out: int, group: TensorGroup, input_is_parallel: bool = True):
        super().__init__(xp, n_in, n_out, group.own(n_in), slice(None), slice(None))
        self.group, self.input_is_parallel = group, input_is_parallel

    def forward(self, x, out=None):
        if not self.input_is_parallel:
            x = ScatterToTP.forward(x, self.group, self.n_in)
        y = ReduceFromTP.forward(self.xp.matmul(x, self.weight, out=out), self.group)
        y += self.bias
        return y, x

    def backward(self, dy, x, need_dx: bool = True, accumulate: bool = False, out=None):
        """dA_t = X_t^T dY, db = sum_B dY (identical on every rank); dX_t = dY A_t^T."""
        dy = ReduceFromTP.backward(dy, self.group)
        self.write_grads(x, dy, accumulate)
        if not need_dx:
            return None
        dx = self.xp.matmul(dy, self.weight.T, out=out)
        if not self.input_is_parallel:
            dx = ScatterToTP.backward(dx, self.group, self.n_in)
        return dx
