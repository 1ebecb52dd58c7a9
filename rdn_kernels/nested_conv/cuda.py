"""``cuda`` backend: launchers for the CUDA kernels of ``csrc/cuda/`` (float32, float16, bfloat16).

Forward (``rdn_kernels._C.nested_conv2d_forward_cuda``): 1×1 convolutions with stride 1 and no
padding, and linear layers, run the hand-written nested pointwise GEMM kernels — tensor cores
(``mma.sync``, fp32 accumulation) for float16 / bfloat16, a SIMT tiled GEMM in exact fp32 for
float32 — one launch for all output groups of the stage, each output tile reducing only over the
input-channel runs of its group, bias fused, and with ``out=`` the groups written straight into
their channel slice of a channels_last (or (N, D, 1, 1)) buffer. NCHW tensors of spatial size
> 1 go through one copy to channels_last (and back for the result). Other convolutions, and
float16 / bfloat16 on GPUs older than sm_80, run per output group as cuDNN convolutions on weight
and input views.

Backward (``nested_conv2d_backward_cuda``), for the same 1×1 cases: grad_input by the same
nested pointwise kernel applied to the transposed weight and the transposed (upper-triangular)
runs — one launch per up to 32 groups, zero on input channels no computed group reads —,
grad_weight by one cuBLAS product per (output group, input run) into an otherwise exactly zero
tensor, grad_bias by a sum. Other convolutions: one cuDNN ``convolution_backward`` per (output
group, input run). Like ``F.conv2d``, the cuDNN / cuBLAS parts follow torch's TF32 settings for
float32; the hand-written kernels never use TF32.
"""

from __future__ import annotations

import torch

from rdn_kernels._extension import extension
from rdn_kernels.layout import NestedLayout

from .geometry import ConvGeometry, extension_arguments


def forward(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    layout: NestedLayout,
    geometry: ConvGeometry,
    lo: int,
    hi: int,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """Output groups ``lo..hi-1``: (N, sum(out_splits[lo:hi]), H_out, W_out), or ``out`` with them written."""
    arguments = extension_arguments(layout, geometry)
    return extension().nested_conv2d_forward_cuda(input, weight, bias, *arguments, lo, hi, out)


def backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    layout: NestedLayout,
    geometry: ConvGeometry,
    lo: int,
    hi: int,
    needs_input: bool,
    needs_weight: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad_input, grad_weight, grad_bias); a gradient not asked for is None (see module docstring)."""
    return extension().nested_conv2d_backward_cuda(
        grad_output, input, weight, has_bias, *extension_arguments(layout, geometry), lo, hi, needs_input, needs_weight
    )
