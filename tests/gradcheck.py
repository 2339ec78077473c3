"""Finite differences and host copies shared by the layer, loss, model and optimizer tests."""

import numpy as np


def host(a) -> np.ndarray:
    """A host copy, so later writes to the device or numpy buffer cannot change it."""
    return a.get() if hasattr(a, "get") else np.array(a)


def numeric_grad(loss, a, h=1e-6) -> np.ndarray:
    """Central differences of the scalar loss() with respect to every entry of `a`, perturbed in place."""
    grad = np.zeros(a.shape)
    for index in np.ndindex(a.shape):
        saved = float(a[index])
        a[index] = saved + h
        plus = loss()
        a[index] = saved - h
        minus = loss()
        a[index] = saved
        grad[index] = (plus - minus) / (2 * h)
    return grad


def rel_error(analytic, numeric) -> float:
    """||a - n|| / (||a|| + ||n||): near 1e-10 for a correct float64 gradient, near 1 for a wrong one."""
    analytic = host(analytic)
    return np.linalg.norm(analytic - numeric) / max(np.linalg.norm(analytic) + np.linalg.norm(numeric), 1e-300)
