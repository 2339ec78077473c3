"""Column- and row-parallel layers equal the unsliced dense layer, outputs and every gradient (float64).

Each test runs for tensor groups of 1, 2 and 4 ranks, carved out of the world (skipped when the
world is smaller), with widths that the group size divides and widths it does not.
"""

import numpy as np
import pytest

from groups import groups_of
from mpitrain.comm.ring import chunk_bounds
from mpitrain.nn.layers import Linear
from mpitrain.parallel.layers import ColumnParallelLinear, RowParallelLinear
from mpitrain.parallel.mappings import TensorGroup
from mpitrain.nn.model import Model

TP_SIZES = [1, 2, 4]
# (in, out): divisible by 1, 2 and 4; divisible by none of 2, 4; narrower than 4 (empty slices).
WIDTHS = [(6, 8), (5, 7), (7, 3)]
RTOL = 1e-10


def dense_reference(n_in, n_out, batch=5, seed=0):
    """Unsliced A, b, X, a fixed dL/dY = R, and the serial results Y, dA, db, dX."""
    rng = np.random.default_rng([seed, n_in, n_out])
    a, b = rng.standard_normal((n_in, n_out)), rng.standard_normal(n_out)
    x, r = rng.standard_normal((batch, n_in)), rng.standard_normal((batch, n_out))
    return dict(a=a, b=b, x=x, r=r, y=x @ a + b, da=x.T @ r, db=r.sum(axis=0), dx=r @ a.T)


def bound(layer, ref):
    """Give `layer` its shard of the reference parameters, in flat buffers as a stage would."""
    params = np.zeros(layer.n_params)
    grads = np.full(layer.n_params, np.nan)
    layer.bind(params, grads, np.empty(layer.weight_shape[0] * layer.weight_shape[1]))
    layer.weight[...] = ref["a"][layer.weight_index]
    layer.bias[...] = ref["b"][layer.bias_index]
    return layer


def close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max(initial=1.0))


@pytest.mark.parametrize("tp_size", TP_SIZES)
@pytest.mark.parametrize("n_in,n_out", WIDTHS)
@pytest.mark.parametrize("gather_output", [False, True])
def test_column_parallel_equals_dense(comm, tp_size, n_in, n_out, gather_output):
    ref = dense_reference(n_in, n_out)
    with groups_of(comm, tp_size) as tp_comm:
        if tp_comm is None:
            return
        group = TensorGroup(tp_comm)
        layer = bound(ColumnParallelLinear(np, n_in, n_out, group, gather_output=gather_output), ref)
        own = group.own(n_out)
        y, saved = layer.forward(ref["x"])
        dx = layer.backward(ref["r"] if gather_output else ref["r"][:, own], saved)
    close(y, ref["y"] if gather_output else ref["y"][:, own])
    close(layer.grad_weight, ref["da"][:, own])
    close(layer.grad_bias, ref["db"][own])
    close(dx, ref["dx"])


@pytest.mark.parametrize("tp_size", TP_SIZES)
@pytest.mark.parametrize("n_in,n_out", WIDTHS)
@pytest.mark.parametrize("input_is_parallel", [True, False])
def test_row_parallel_equals_dense(comm, tp_size, n_in, n_out, input_is_parallel):
    ref = dense_reference(n_in, n_out)
    with groups_of(comm, tp_size) as tp_comm:
        if tp_comm is None:
            return
        group = TensorGroup(tp_comm)
        layer = bound(RowParallelLinear(np, n_in, n_out, group, input_is_parallel=input_is_parallel), ref)
        own = group.own(n_in)
        y, saved = layer.forward(ref["x"][:, own] if input_is_parallel else ref["x"])
        dx = layer.backward(ref["r"], saved)
    close(y, ref["y"])
    close(layer.grad_weight, ref["da"][own, :])
    close(layer.grad_bias, ref["db"])
    close(dx, ref["dx"][:, own] if input_is_parallel else ref["dx"])


def ring_allreduce_bytes(elements: int, size: int) -> int:
    """What the ring all-reduce sends from rank 0: every chunk but its own, then every chunk but the next."""
    sizes = [stop - start for start, stop in chunk_bounds(elements, size)]
    return 0 if size == 1 else 8 * (2 * elements - sizes[0] - sizes[1 % size])


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_column_relu_row_block_costs_one_sum_each_way(comm, tp_size):
    """Y = relu(X A1 + b1) A2 + b2 sliced as column -> row: equal to dense, and rank 0 sends exactly
    one all-reduce of the (B, out) output in forward and one of the (B, in) input gradient in backward."""
    n_in, hidden, n_out, batch = 5, 7, 4, 6
    first, second = dense_reference(n_in, hidden, batch, seed=1), dense_reference(hidden, n_out, batch, seed=2)
    h = first["x"] @ first["a"] + first["b"]
    y = np.maximum(h, 0) @ second["a"] + second["b"]
    r = second["r"]
    dh = (r @ second["a"].T) * (h > 0)
    with groups_of(comm, tp_size) as tp_comm:
        if tp_comm is None:
            return
        group = TensorGroup(tp_comm)
        column = bound(ColumnParallelLinear(np, n_in, hidden, group), first)
        row = bound(RowParallelLinear(np, hidden, n_out, group), second)
        h_local, saved_column = column.forward(first["x"])
        out, saved_row = row.forward(np.maximum(h_local, 0))
        forward_bytes = group.bytes_sent
        dx = column.backward(row.backward(r, saved_row) * (h_local > 0), saved_column)
        backward_bytes = group.bytes_sent - forward_bytes
        own = group.own(hidden)
        rank = tp_comm.rank
    close(out, y)
    close(dx, dh @ first["a"].T)
    close(column.grad_weight, (first["x"].T @ dh)[:, own])
    close(row.grad_weight, (np.maximum(h, 0).T @ r)[own, :])
    if rank == 0:
        assert forward_bytes == ring_allreduce_bytes(batch * n_out, tp_size)
        assert backward_bytes == ring_allreduce_bytes(batch * n_in, tp_size)


def test_accumulate_adds_to_the_gradients(comm):
    ref = dense_reference(4, 3)
    layer = bound(Linear(np, 4, 3), ref)
    _, saved = layer.forward(ref["x"])
    layer.backward(ref["r"], saved)
    layer.backward(ref["r"], saved, accumulate=True)
    close(layer.grad_weight, 2 * ref["da"])
    close(layer.grad_bias, 2 * ref["db"])


@pytest.mark.parametrize("tp_size", TP_SIZES)
@pytest.mark.parametrize("hidden", [8, 10])
def test_each_rank_holds_its_share_of_a_sliced_layer(comm, tp_size, hidden):
    """The column and row layers of a 6-h-h-4 stage hold 1/T of their weights per rank (one column
    more or less when T does not divide h); the unpaired output layer is whole on every rank."""
    widths = [6, hidden, hidden, 4]
    with groups_of(comm, tp_size) as tp_comm:
        if tp_comm is None:
            return
        stage = Model(widths, "relu", np, np.float64, group=TensorGroup(tp_comm), layers=(0, 3))
        sizes = [layer.weight.size for layer in stage.dense]
        totals = tp_comm.allreduce(np.array(sizes[:2]))
        columns = [stage.dense[0].weight.shape[1], stage.dense[1].weight.shape[0]]
    kinds = [type(layer).__name__ for layer in stage.dense]
    assert kinds == (["Linear"] * 3 if tp_size == 1 else ["ColumnParallelLinear", "RowParallelLinear", "Linear"])
    assert totals.tolist() == [6 * hidden, hidden * hidden]
    for own in columns:
        assert hidden // tp_size <= own <= -(-hidden // tp_size)
    if hidden % tp_size == 0:
        assert sizes[:2] == [6 * hidden // tp_size, hidden * hidden // tp_size]
    assert sizes[2] == hidden * 4
    assert stage.params.size == sum(layer.n_params for layer in stage.dense)
