"""``cpp`` backend: launchers for the C++ CPU kernels of ``csrc/cpu/nested_conv_cpu.cpp``."""

from __future__ import annotations

import torch

from rdn_kernels._extension import extension
from rdn_kernels.layout import NestedLayout

from .geometry import ConvGeometry, extension_arguments


def _is_pixel_layout(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous() or tensor.is_contiguous(memory_format=torch.channels_last)


def _pixel_layout(tensor: torch.Tensor) -> torch.Tensor:
    # The kernels take NCHW- or NHWC-contiguous tensors (no copy then); anything else is copied once.
    return tensor if _is_pixel_layout(tensor) else tensor.contiguous()


def forward(input, weight, bias, layout: NestedLayout, geometry: ConvGeometry, lo: int, hi: int, out):
    bias = None if bias is None else bias.contiguous()
    arguments = (_pixel_layout(input), weight, bias, *extension_arguments(layout, geometry), lo, hi)
    if out is None or _is_pixel_layout(out):
        return extension().nested_conv2d_forward_cpu(*arguments, out)
    # The kernels write NCHW or NHWC buffers; any other `out` gets the result copied in.
    result = extension().nested_conv2d_forward_cpu(*arguments, None)
    out.narrow(1, layout.out_offsets[lo], result.shape[1]).copy_(result)
    return out


def backward(grad_output, input, weight, has_bias, layout, geometry, lo, hi, needs_input, needs_weight):
    grad_input, grad_weight, grad_bias = extension().nested_conv2d_backward_cpu(
        _pixel_layout(grad_output),
        _pixel_layout(input),
        weight,
        has_bias,
        *extension_arguments(layout, geometry),
        lo,
        hi,
        needs_input,
        needs_weight,
    )
    return grad_input, grad_weight, grad_bias
