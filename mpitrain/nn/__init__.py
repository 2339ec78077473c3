"""Layers and losses (forward next to backward) and the flat-buffer model container."""

from mpitrain.nn.layers import Linear, ReLU, Tanh
from mpitrain.nn.losses import MeanSquaredError, SoftmaxCrossEntropy
from mpitrain.nn.model import Sequential, parse_widths

__all__ = ["Linear", "ReLU", "Tanh", "SoftmaxCrossEntropy", "MeanSquaredError", "Sequential", "parse_widths"]
