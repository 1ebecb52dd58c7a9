"""``cpp`` backend: launchers for the C++ CPU kernels of ``csrc/cpu/nested_conv_cpu.cpp``."""

from __future__ import annotations

from rdn_kernels._extension import extension
from rdn_kernels.layout import NestedLayout

from .geometry import ConvGeometry, extension_arguments


def forward(input, weight, bias, layout: NestedLayout, geometry: ConvGeometry, lo: int, hi: int, out):
    # Inputs, biases and `out` buffers of any layout: the C++ entry copies what its kernels cannot
    # read or write in place (anything but NCHW- and NHWC-contiguous tensors, a strided bias).
    return extension().nested_conv2d_forward_cpu(input, weight, bias, *extension_arguments(layout, geometry), lo, hi,
                                                 out)


def backward(grad_output, input, weight, has_bias, layout, geometry, lo, hi, needs_input, needs_weight):
    return extension().nested_conv2d_backward_cpu(grad_output, input, weight, has_bias,
                                                  *extension_arguments(layout, geometry), lo, hi, needs_input,
                                                  needs_weight)  # fmt: skip
