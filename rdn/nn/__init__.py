"""Modules of the model library: nested (block-lower-triangular) layers over :mod:`rdn_kernels`."""

from rdn.nn.nested import NestedConv2d, NestedLinear, split_channels

__all__ = ["NestedConv2d", "NestedLinear", "split_channels"]
