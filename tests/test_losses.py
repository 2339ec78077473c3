"""Losses: values match their definitions, backward(scale) is the gradient of scale * sum."""

import numpy as np
import pytest

from mpitrain.errors import MpitrainError
from mpitrain.nn.losses import MeanSquaredError, SoftmaxCrossEntropy
from gradcheck import host, numeric_grad, rel_error


def classification_batch(xp, batch=6, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((batch, classes)) * 3
    labels = rng.integers(0, classes, size=batch)
    return xp.asarray(logits), xp.asarray(labels), logits, labels


def test_cross_entropy_value_is_the_definition(xp):
    logits, labels, logits_host, labels_host = classification_batch(xp)
    probs = np.exp(logits_host) / np.exp(logits_host).sum(axis=1, keepdims=True)
    expected = -np.log(probs[np.arange(len(labels_host)), labels_host]).sum()
    assert np.isclose(SoftmaxCrossEntropy(xp).forward(logits, labels), expected, rtol=1e-12)


def test_cross_entropy_gradient(xp):
    logits, labels, _, _ = classification_batch(xp)
    loss, scale = SoftmaxCrossEntropy(xp), 0.37
    loss.forward(logits, labels)
    analytic = loss.backward(scale)
    assert rel_error(analytic, numeric_grad(lambda: scale * loss.forward(logits, labels), logits)) < 1e-6


def test_cross_entropy_is_stable_for_huge_logits(xp):
    logits, labels, _, _ = classification_batch(xp)
    loss = SoftmaxCrossEntropy(xp)
    small = loss.forward(logits, labels)
    small_grad = host(loss.backward(1.0))
    # Softmax is invariant to a per-row shift; naive exp() would overflow at 1e4.
    huge = loss.forward(logits + 1e4, labels)
    huge_grad = host(loss.backward(1.0))
    assert np.isfinite(huge) and np.isclose(huge, small, rtol=1e-9)
    np.testing.assert_allclose(huge_grad, small_grad, atol=1e-9)


def test_correct_counts_argmax_hits(xp):
    logits, _, logits_host, _ = classification_batch(xp, batch=10, classes=5)
    argmax = logits_host.argmax(axis=1)
    hits = 7
    labels = np.where(np.arange(10) < hits, argmax, (argmax + 1) % 5)
    assert SoftmaxCrossEntropy(xp).correct(logits, xp.asarray(labels)) == hits


@pytest.mark.parametrize("target_shape", [(5,), (5, 3)])
def test_mse_value_and_gradient(xp, target_shape):
    rng = np.random.default_rng(3)
    target_host = rng.standard_normal(target_shape)
    pred_host = rng.standard_normal((5, 1) if len(target_shape) == 1 else target_shape)
    pred, target = xp.asarray(pred_host), xp.asarray(target_host)
    loss, scale = MeanSquaredError(xp), 0.25
    value = loss.forward(pred, target)
    expected = ((pred_host - target_host.reshape(pred_host.shape)) ** 2).mean(axis=1).sum()
    assert np.isclose(value, expected, rtol=1e-12)
    analytic = loss.backward(scale)
    assert analytic.shape == pred.shape
    assert rel_error(analytic, numeric_grad(lambda: scale * loss.forward(pred, target), pred)) < 1e-6


def test_mse_rejects_mismatched_target(xp):
    with pytest.raises(MpitrainError, match=r"target shape \(4, 2\) does not match prediction shape \(4, 3\)"):
        MeanSquaredError(xp).forward(xp.zeros((4, 3)), xp.zeros((4, 2)))
