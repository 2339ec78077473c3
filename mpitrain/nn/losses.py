"""Losses that return the SUM over the local batch, and the gradient of scale * sum.

forward returns a 0-d array of the array backend (on a GPU it stays there): reading it on the
host would wait for the device every step; the trainer adds the step losses on the device and
reads the sum once per epoch.

Summing (not averaging) lets ranks with unequal local batches combine exactly: the trainer passes
scale = 1/global_batch, so the all-reduced gradient is the gradient of the global-batch mean.
"""

from mpitrain.errors import MpitrainError


class SoftmaxCrossEntropy:
    """L = -sum_i log softmax(z_i)[y_i] for logits z (B, C) and integer labels y (B,)."""

    def __init__(self, xp):
        self.xp = xp

    def forward(self, logits, labels):
        xp = self.xp
        # Subtracting the row max makes exp() overflow-free without changing the softmax.
        shifted = logits - xp.max(logits, axis=1, keepdims=True)
        log_probs = shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))
        self.rows = xp.arange(len(labels))
        self.labels = labels
        self.probs = xp.exp(log_probs)
        return -xp.sum(log_probs[self.rows, labels])

    def backward(self, scale: float):
        """d(scale * L)/dz = scale * (softmax(z) - onehot(y)), shape (B, C)."""
        grad = self.probs.copy()
        grad[self.rows, self.labels] -= 1
        grad *= scale
        return grad

    def correct(self, logits, labels) -> int:
        """Number of rows whose argmax logit is the label (a 0-d array of the backend)."""
        return self.xp.sum(self.xp.argmax(logits, axis=1) == labels)


class MeanSquaredError:
    """L = sum_i mean_k (p_ik - t_ik)^2 for predictions p (B, K); a 1-D target t (B,) means (B, 1)."""

    def __init__(self, xp):
        self.xp = xp

    def forward(self, pred, target):
        if target.ndim == 1:
            target = target.reshape(-1, 1)
        # Checked because (B, 1) - (B,) would silently broadcast to (B, B).
        if target.shape != pred.shape:
            raise MpitrainError(
                f"MeanSquaredError: target shape {tuple(target.shape)} does not match "
                f"prediction shape {tuple(pred.shape)}"
            )
        self.diff = pred - target
        return self.xp.sum(self.diff * self.diff) / pred.shape[1]

    def backward(self, scale: float):
        """d(scale * L)/dp = scale * 2 (p - t) / K, shape (B, K)."""
        return self.diff * (2 * scale / self.diff.shape[1])


def make_loss(kind: str, xp):
    """'ce' -> SoftmaxCrossEntropy, 'mse' -> MeanSquaredError, on array module xp."""
    return SoftmaxCrossEntropy(xp) if kind == "ce" else MeanSquaredError(xp)
