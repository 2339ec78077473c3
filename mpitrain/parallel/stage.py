"""One rank's forward and backward of a step, whatever the layout: the pipeline schedule over
micro-batches on this rank's stage. One stage and one micro-batch (data parallelism, tensor
parallelism, a parameter-server worker) is the schedule [F 0, B 0]: a plain forward and backward.

Each step, the first stage takes this rank's rows of the global batch (every rank of a tensor
group takes the same rows); the micro-batches flow through the stages in schedule order; the last
stage computes the loss, scaled by 1/global batch so the gradients of all ranks add up to the
global-batch mean.
"""

import numpy as np

from mpitrain.backend import read_scalar
from mpitrain.parallel.pipeline import StageLink, micro_batch_bounds


class Stage:
    """This rank's model (its stage, sliced over its tensor group), the links to the neighbouring
    stages, and the loss (used on the last stage only)."""

    def __init__(self, model, link: StageLink, loss, actions: list[tuple[str, int]], micro_batches: int,
                 first_stage: bool, last_stage: bool):
        self.model, self.link, self.loss, self.actions = model, link, loss, actions
        self.micro_batches, self.first_stage, self.last_stage = micro_batches, first_stage, last_stage
        self.dtype = model.dtype
        # Gradients are final after the step's last backward: only it reports finished layers.
        self.last_backward = max(i for i, (action, _) in enumerate(actions) if action == "B")

    def forward_backward(self, x, y, scale: float, on_layer_done=None, before_layer=None):
        """Run one step's schedule; gradients of the local shards end up in model.grads.
        on_layer_done(i): local dense layer i's gradient is final (its last backward);
        before_layer(i): the step's first forward is about to run local dense layer i.
        Returns the summed loss of this rank's samples on the last stage (a 0-d array of the
        backend, left on the device: nothing here waits for the GPU), else 0.0.

        NumPy's warnings about NaN and overflow are silenced here: a non-finite loss or gradient
        is the --on-nan policy's to report, once, with the step it happened in."""
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            return self._forward_backward(x, y, scale, on_layer_done, before_layer)

    def _forward_backward(self, x, y, scale: float, on_layer_done, before_layer) -> float:
        model, link = self.model, self.link
        bounds = micro_batch_bounds(len(x), self.micro_batches)
        output_grads, loss_sum, accumulate = {}, 0.0, False
        for index, (action, micro) in enumerate(self.actions):
            start, stop = bounds[micro]
            if action == "F":
                if self.first_stage:
                    inputs = x[start:stop]
                else:
                    inputs = link.recv_activation((stop - start, model.input_width), self.dtype, micro)
                out = model.forward(inputs, micro, before_layer if index == 0 else None)
                if self.last_stage:
                    # summed in float64 on the device, as the host used to sum its floats
                    loss_sum = loss_sum + self.loss.forward(out, y[start:stop], micro).astype(np.float64)
                    output_grads[micro] = self.loss.backward(scale, micro)
                else:
                    link.send_activation(out, micro)
            else:
                if self.last_stage:
                    dy = output_grads.pop(micro)
                else:
                    dy = link.recv_gradient((stop - start, model.output_width), self.dtype, micro)
                dx = model.backward(dy, micro, accumulate,
                                    on_layer_done if index == self.last_backward else None)
                accumulate = True
                if not self.first_stage:
                    link.send_gradient(dx, micro)
        link.finish()
        return loss_sum

    def evaluate(self, x, y, counts: bool) -> np.ndarray:
        """This rank's (loss sum, correct, rows) over validation rows (x, y), through the pipeline
        without keeping activations; zeros unless `counts` (one rank per data-parallel group's last
        stage reports, so the world's sum counts each row once)."""
        model, link = self.model, self.link
        totals = np.zeros(3)
        if not len(x):
            return totals
        inputs = x if self.first_stage else link.recv_activation((len(x), model.input_width), self.dtype, 0)
        out = model.forward(inputs, None)
        if not self.last_stage:
            link.send_activation(out, 0)
        elif counts:
            totals[0] = read_scalar(self.loss.forward(out, y))
            totals[1] = read_scalar(self.loss.correct(out, y)) if hasattr(self.loss, "correct") else 0.0
            totals[2] = len(x)
        link.finish()
        return totals
