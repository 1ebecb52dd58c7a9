"""Pure-PyTorch reference of the nested convolution: one ``F.conv2d`` per block in the mask.

Obviously correct and slow; the oracle every other backend is tested against. Its backward is
PyTorch autograd through this forward, so blocks outside the mask (never read) get exactly zero
gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rdn_kernels.layout import NestedLayout

from .geometry import ConvGeometry, output_memory_format


def nested_conv2d_reference(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    layout: NestedLayout,
    geometry: ConvGeometry,
    lo: int,
    hi: int,
) -> torch.Tensor:
    """Output groups ``lo..hi-1``: (N, sum(out_splits[lo:hi]), H_out, W_out).

    ``Y_j = Σ_{i : mask[j][i]} conv2d(X_i, W[j, i]) + b_j``.
    """
    batch = input.shape[0]
    height_out, width_out = geometry.output_size(input.shape[2], input.shape[3], weight.shape[2:])
    groups = []
    for j in range(lo, hi):
        out_start, out_stop = layout.out_offsets[j], layout.out_offsets[j + 1]
        group = input.new_zeros(batch, out_stop - out_start, height_out, width_out)
        for i in range(j + 1):
            in_start, in_stop = layout.in_offsets[i], layout.in_offsets[i + 1]
            if not layout.mask[j][i] or in_stop == in_start or out_stop == out_start:
                continue
            group = group + F.conv2d(
                input[:, in_start:in_stop],
                weight[out_start:out_stop, in_start:in_stop],
                None,
                geometry.stride,
                geometry.padding,
                geometry.dilation,
            )
        if bias is not None:
            group = group + bias[out_start:out_stop].view(1, -1, 1, 1)
        groups.append(group)
    return torch.cat(groups, dim=1)


def nested_conv2d_reference_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    layout: NestedLayout,
    geometry: ConvGeometry,
    lo: int,
    hi: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients (input, weight, bias) of :func:`nested_conv2d_reference`, one block at a time.

    ``grad_output`` is (N, sum(out_splits[lo:hi]), H_out, W_out). Blocks outside the mask and
    output groups outside ``lo..hi-1`` get exactly zero weight gradient.
    """
    grad_input = torch.zeros_like(input, memory_format=torch.contiguous_format)
    grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    grad_bias = weight.new_zeros(weight.shape[0]) if has_bias else None
    base = layout.out_offsets[lo]
    for j in range(lo, hi):
        out_start, out_stop = layout.out_offsets[j], layout.out_offsets[j + 1]
        grad_group = grad_output[:, out_start - base : out_stop - base]
        if grad_bias is not None:
            grad_bias[out_start:out_stop] = grad_group.sum(dim=(0, 2, 3))
        for i in range(j + 1):
            in_start, in_stop = layout.in_offsets[i], layout.in_offsets[i + 1]
            if not layout.mask[j][i] or in_stop == in_start or out_stop == out_start:
                continue
            block_grad_input, block_grad_weight, _ = torch.ops.aten.convolution_backward(
                grad_group,
                input[:, in_start:in_stop],
                weight[out_start:out_stop, in_start:in_stop],
                None,
                list(geometry.stride),
                list(geometry.padding),
                list(geometry.dilation),
                False,
                [0, 0],
                1,
                [True, True, False],
            )
            grad_input[:, in_start:in_stop] += block_grad_input
            grad_weight[out_start:out_stop, in_start:in_stop] = block_grad_weight
    return grad_input, grad_weight, grad_bias


# The backend interface every backend module of this op family implements.


def forward(input, weight, bias, layout, geometry, lo, hi, out):
    result = nested_conv2d_reference(input, weight, bias, layout, geometry, lo, hi)
    if out is None:
        return result.contiguous(memory_format=output_memory_format(input))
    out.narrow(1, layout.out_offsets[lo], result.shape[1]).copy_(result)
    return out


def backward(grad_output, input, weight, has_bias, layout, geometry, lo, hi, needs_input, needs_weight):
    grad_input, grad_weight, grad_bias = nested_conv2d_reference_backward(
        grad_output, input, weight, has_bias, layout, geometry, lo, hi
    )
    return (grad_input if needs_input else None), (grad_weight if needs_weight else None), grad_bias

