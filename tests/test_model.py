"""Model: whole-model gradients, the flat buffer layout, state round trips and parse_widths."""

import numpy as np
import pytest

from mpitrain.errors import MpitrainError
from mpitrain.nn.layers import weight_init
from mpitrain.nn.losses import SoftmaxCrossEntropy
from mpitrain.nn.model import Model, parse_widths
from gradcheck import host


WIDTHS = [5, 7, 6, 3]


def batch(xp, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return xp.asarray(rng.standard_normal((size, WIDTHS[0]))), xp.asarray(rng.integers(0, WIDTHS[-1], size))


def forward_backward(model, x, labels):
    loss = SoftmaxCrossEntropy(model.xp)
    loss.forward(model.forward(x), labels)
    model.backward(loss.backward(1 / len(labels)))


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_whole_model_gradient(xp, activation):
    model = Model(WIDTHS, activation, xp=xp, dtype=np.float64, seed=4)
    x, labels = batch(xp)
    loss = SoftmaxCrossEntropy(xp)

    def mean_loss():
        return loss.forward(model.forward(x), labels) / len(labels)

    forward_backward(model, x, labels)
    analytic = host(model.grads)
    # Perturbing the flat buffer moves the layers' weights: the views really are the parameters.
    numeric = np.zeros(model.params.size)
    h = 1e-6
    for i in range(model.params.size):
        saved = float(model.params[i])
        model.params[i] = saved + h
        plus = mean_loss()
        model.params[i] = saved - h
        minus = mean_loss()
        model.params[i] = saved
        numeric[i] = (plus - minus) / (2 * h)
    error = np.linalg.norm(analytic - numeric) / (np.linalg.norm(analytic) + np.linalg.norm(numeric))
    assert error < 1e-6


def test_grads_are_overwritten_not_accumulated(xp):
    model = Model(WIDTHS, xp=xp, dtype=np.float64)
    x, labels = batch(xp)
    model.grads[...] = 0
    forward_backward(model, x, labels)
    from_zero = host(model.grads)
    model.grads[...] = np.nan
    forward_backward(model, x, labels)
    np.testing.assert_array_equal(host(model.grads), from_zero)


def test_layer_callbacks_run_last_layer_first_with_final_grads(xp):
    model = Model(WIDTHS, xp=xp, dtype=np.float64)
    x, labels = batch(xp)
    slices = model.layer_grad_slices()
    seen = {}

    def on_layer_done(i):
        start, stop = slices[i]
        seen[i] = host(model.grads[start:stop])

    model.grads[...] = np.nan
    loss = SoftmaxCrossEntropy(xp)
    loss.forward(model.forward(x), labels)
    model.backward(loss.backward(1.0), on_layer_done=on_layer_done)
    assert list(seen) == [2, 1, 0]
    for i, (start, stop) in enumerate(slices):
        np.testing.assert_array_equal(seen[i], host(model.grads[start:stop]))


# ---------------------------------------------------------------------------- flat buffers


def test_named_parameters_are_views_of_the_flat_buffer(xp):
    model = Model(WIDTHS, xp=xp)
    named = model.named_parameters()
    expected_names = [f"{i}/{kind}" for i in range(len(WIDTHS) - 1) for kind in ("weight", "bias")]
    assert [name for name, _ in named] == expected_names
    for i, (n_in, n_out) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        assert dict(named)[f"{i}/weight"].shape == (n_in, n_out)
        assert dict(named)[f"{i}/bias"].shape == (n_out,)
    # The views tile the flat buffer in order, with nothing before, between or after them.
    np.testing.assert_array_equal(host(model.params), np.concatenate([host(v).ravel() for _, v in named]))
    # Writes go both ways: through a view into the flat buffer, and through the flat buffer into a view.
    named[2][1][...] = 7
    start, stop = model.layer_grad_slices()[1]
    assert host(model.params[start:stop] == 7).sum() == WIDTHS[1] * WIDTHS[2]
    model.params[...] = -1
    assert all(bool((view == -1).all()) for _, view in named)


def test_layer_grad_slices_tile_the_grads(xp):
    model = Model(WIDTHS, xp=xp, dtype=np.float64)
    x, labels = batch(xp)
    forward_backward(model, x, labels)
    slices = model.layer_grad_slices()
    assert slices[0][0] == 0 and slices[-1][1] == model.grads.size
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
    for layer, (start, stop) in zip(model.dense, slices):
        expected = np.concatenate([host(layer.grad_weight).ravel(), host(layer.grad_bias)])
        np.testing.assert_array_equal(host(model.grads[start:stop]), expected)


# ---------------------------------------------------------------------------- init and state


def test_init_is_seeded_and_identical_on_every_backend(xp):
    here = Model(WIDTHS, xp=xp, seed=11)
    on_cpu = Model(WIDTHS, xp=np, seed=11)
    np.testing.assert_array_equal(host(here.params), on_cpu.params)
    assert not np.array_equal(on_cpu.params, Model(WIDTHS, seed=12).params)
    assert here.params.dtype == np.float32
    for _, bias in (p for p in here.named_parameters() if p[0].endswith("bias")):
        assert not host(bias).any()


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_init_draws_each_layer_for_the_activation_that_follows_it(activation):
    model = Model(WIDTHS, activation, dtype=np.float64, seed=3)
    rng = np.random.default_rng(3)
    kinds = [activation] * (len(WIDTHS) - 2) + ["identity"]
    for (n_in, n_out), kind, layer in zip(zip(WIDTHS[:-1], WIDTHS[1:]), kinds, model.dense):
        np.testing.assert_array_equal(layer.weight, weight_init(rng, n_in, n_out, kind))


def test_forward_keeps_the_dtype(xp):
    model = Model(WIDTHS, xp=xp)
    x, _ = batch(xp)
    out = model.forward(x.astype(np.float32))
    assert out.shape == (8, WIDTHS[-1]) and out.dtype == np.float32


def test_forward_buffers_are_one_set_per_micro_batch_in_flight(xp):
    """Micro-batches 0 and 1 in flight hold two sets; once 0's backward is done, 2 takes 0's set;
    a forward repeated without its backward takes its own set again. Outputs are those buffers."""
    model = Model([5, 7, 3], xp=xp, dtype=np.float64)
    x = xp.ones((4, 5))
    outputs = {micro: model.forward(x, micro) for micro in (0, 1)}
    assert outputs[0] is not outputs[1]
    model.backward(xp.ones((4, 3)), 0)
    assert model.forward(x, 2) is outputs[0]
    assert model.forward(x, 2) is outputs[0] and len(model._slots) == 2


def test_state_round_trip(xp):
    source = Model(WIDTHS, xp=xp, seed=1)
    target = Model(WIDTHS, xp=xp, seed=2)
    state = source.state()
    assert all(isinstance(a, np.ndarray) for a in state.values())
    target.load_state(state)
    np.testing.assert_array_equal(host(target.params), host(source.params))
    # state() hands out copies: changing them leaves the model alone.
    state["0/weight"][...] = 0
    assert host(source.params).any()


def test_load_state_rejects_a_wrong_shape_before_writing(xp):
    model = Model(WIDTHS, xp=xp)
    before = host(model.params)
    state = Model(WIDTHS, xp=xp, seed=5).state()
    state["1/weight"] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(MpitrainError, match=r"'1/weight'.*\(3, 3\).*\(7, 6\)"):
        model.load_state(state)
    np.testing.assert_array_equal(host(model.params), before)
    del state["1/weight"]
    with pytest.raises(MpitrainError, match="1/weight"):
        model.load_state(state)


def test_bad_construction_arguments():
    with pytest.raises(MpitrainError, match="activation 'sigmoid'"):
        Model(WIDTHS, activation="sigmoid")
    with pytest.raises(MpitrainError, match="dtype 'int32'"):
        Model(WIDTHS, dtype=np.int32)


# ---------------------------------------------------------------------------- parse_widths


def test_parse_widths():
    assert parse_widths("784-1024-10") == [784, 1024, 10]
    assert parse_widths("2-1") == [2, 1]


@pytest.mark.parametrize("spec", ["784-x-10", "784", "0-10", "", "-784-10", "784--10", "784-10-", "784-1.5-10"])
def test_parse_widths_rejects_malformed_specs(spec):
    with pytest.raises(MpitrainError) as caught:
        parse_widths(spec)
    message = str(caught.value)
    assert f"'{spec}'" in message and "\n" not in message
