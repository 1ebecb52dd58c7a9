"""Modules of the model library: nested (block-lower-triangular) layers over :mod:`rdn_kernels`."""

from rdn.nn.grouped_norm import GroupedNorm
from rdn.nn.nested import NestedConv2d, NestedLinear, split_channels

__all__ = ["GroupedNorm", "NestedConv2d", "NestedLinear", "split_channels"]
