"""Layers and losses (forward next to backward) and the flat-buffer model of every layout."""

from mpitrain.nn.layers import Linear, ReLU, Tanh
from mpitrain.nn.losses import MeanSquaredError, SoftmaxCrossEntropy
from mpitrain.nn.model import Model, parse_widths

__all__ = ["Linear", "ReLU", "Tanh", "SoftmaxCrossEntropy", "MeanSquaredError", "Model", "parse_widths"]
