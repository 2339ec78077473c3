"""Losses that return the SUM over the local batch, and the gradient of scale * sum.

forward returns a 0-d array of the array backend (on a GPU it stays there): reading it on the
host would wait for the device every step; the trainer adds the step losses on the device and
reads the sum once per epoch.

Summing (not averaging) lets ranks with unequal local batches combine exactly: the trainer passes
scale = 1/global_batch, so the all-reduced gradient is the gradient of the global-batch mean.
"""

from mpitrain.errors import MpitrainError


class _Buffers:
    """Arrays kept per (micro-batch, shape): a step's losses allocate nothing after the first step,
    and the gradients of several micro-batches in flight (GPipe) never share one."""

    def __init__(self, xp):
        self.xp, self._arrays = xp, {}

    def get(self, name: str, micro, shape, dtype):
        key = (name, micro, shape, dtype)
        if key not in self._arrays:
            self._arrays[key] = self.xp.empty(shape, dtype=dtype)
        return self._arrays[key]


class SoftmaxCrossEntropy:
    """L = -sum_i log softmax(z_i)[y_i] for logits z (B, C) and integer labels y (B,)."""

    def __init__(self, xp):
        self.xp = xp
        self.buffers = _Buffers(xp)
        self._kept: dict = {}
        self._rows: dict = {}

    def forward(self, logits, labels, micro=0):
        """The loss; keeps softmax(z) for backward under `micro` (a micro-batch in flight)."""
        xp, rows = self.xp, len(labels)
        log_probs = self.buffers.get("log_probs", micro, logits.shape, logits.dtype)
        probs = self.buffers.get("probs", micro, logits.shape, logits.dtype)
        norm = self.buffers.get("norm", micro, (rows, 1), logits.dtype)
        # Subtracting the row max makes exp() overflow-free without changing the softmax.
        xp.max(logits, axis=1, keepdims=True, out=norm)
        xp.subtract(logits, norm, out=log_probs)
        xp.exp(log_probs, out=probs)
        xp.sum(probs, axis=1, keepdims=True, out=norm)
        xp.log(norm, out=norm)
        log_probs -= norm
        xp.exp(log_probs, out=probs)
        index = self._rows.get(rows)
        if index is None:
            index = self._rows[rows] = xp.arange(rows)
        self._kept[micro] = (probs, index, labels)
        return -xp.sum(log_probs[index, labels])

    def backward(self, scale: float, micro=0):
        """d(scale * L)/dz = scale * (softmax(z) - onehot(y)), shape (B, C)."""
        probs, index, labels = self._kept.pop(micro)
        grad = self.buffers.get("grad", micro, probs.shape, probs.dtype)
        grad[...] = probs
        grad[index, labels] -= 1
        grad *= scale
        return grad

    def correct(self, logits, labels):
        """Number of rows whose argmax logit is the label (a 0-d array of the backend)."""
        return self.xp.sum(self.xp.argmax(logits, axis=1) == labels)


class MeanSquaredError:
    """L = sum_i mean_k (p_ik - t_ik)^2 for predictions p (B, K); a 1-D target t (B,) means (B, 1)."""

    def __init__(self, xp):
        self.xp = xp
        self.buffers = _Buffers(xp)
        self._kept: dict = {}

    def forward(self, pred, target, micro=0):
        if target.ndim == 1:
            target = target.reshape(-1, 1)
        # Checked because (B, 1) - (B,) would silently broadcast to (B, B).
        if target.shape != pred.shape:
            raise MpitrainError(
                f"MeanSquaredError: target shape {tuple(target.shape)} does not match "
                f"prediction shape {tuple(pred.shape)}"
            )
        diff = self.buffers.get("diff", micro, pred.shape, pred.dtype)
        self.xp.subtract(pred, target, out=diff)
        self._kept[micro] = diff
        return self.xp.sum(diff * diff) / pred.shape[1]

    def backward(self, scale: float, micro=0):
        """d(scale * L)/dp = scale * 2 (p - t) / K, shape (B, K)."""
        diff = self._kept.pop(micro)
        grad = self.buffers.get("grad", micro, diff.shape, diff.dtype)
        return self.xp.multiply(diff, 2 * scale / diff.shape[1], out=grad)


def make_loss(kind: str, xp):
    """'ce' -> SoftmaxCrossEntropy, 'mse' -> MeanSquaredError, on array module xp."""
    return SoftmaxCrossEntropy(xp) if kind == "ce" else MeanSquaredError(xp)
