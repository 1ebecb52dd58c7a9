"""Stride / padding / dilation of a 2-D convolution, validated once."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from rdn_kernels.layout import NestedLayout


def int_pair(name: str, value, minimum: int) -> tuple[int, int]:
    """``value`` (an int or a pair of ints, each >= ``minimum``) as a pair; errors name ``name``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) for v in value)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in value):
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(value)}")
    return (value[0], value[1])


@dataclass(frozen=True)
class ConvGeometry:
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @classmethod
    def from_args(cls, stride=1, padding=0, dilation=1) -> ConvGeometry:
        if _is_plain(stride) and _is_plain(padding) and _is_plain(dilation):
            return _cached_geometry(stride, padding, dilation)  # hot path: validated once
        return cls._validated(stride, padding, dilation)

    @classmethod
    def _validated(cls, stride, padding, dilation) -> ConvGeometry:
        if isinstance(padding, str):
            raise ValueError(
                f"padding must be an int or a pair of ints, got the string {padding!r}; "
                "give the explicit amount (for 'same' with an odd kernel k: (k - 1) // 2 · dilation)"
            )
        return cls(int_pair("stride", stride, 1), int_pair("padding", padding, 0), int_pair("dilation", dilation, 1))

    def __post_init__(self) -> None:
        # Precomputed (frozen, so set through object): output_size asks on every call of the op.
        object.__setattr__(self, "_size_preserving", self.stride == (1, 1) and self.padding == (0, 0))

    def output_size(self, height: int, width: int, kernel_size) -> tuple[int, int]:
        kernel_h, kernel_w = kernel_size
        if kernel_h == 1 and kernel_w == 1 and self._size_preserving:  # a 1×1 layer: the usual nested case
            return height, width
        # Written out per axis, without a helper: this runs on every call of the op.
        (stride_h, stride_w), (pad_h, pad_w), (dilation_h, dilation_w) = self.stride, self.padding, self.dilation
        return (
            (height + 2 * pad_h - dilation_h * (kernel_h - 1) - 1) // stride_h + 1,
            (width + 2 * pad_w - dilation_w * (kernel_w - 1) - 1) // stride_w + 1,
        )

    @property
    def is_pointwise_identity(self) -> bool:
        """True when a 1×1 kernel with this geometry is a plain GEMM over pixels."""
        return self.stride == (1, 1) and self.padding == (0, 0)


def _is_plain(value) -> bool:
    # Exact types only, so that a cache hit can never skip a TypeError (1 == 1.0 == True hash alike).
    return type(value) is int or (type(value) is tuple and len(value) == 2 and type(value[0]) is int
                                  and type(value[1]) is int)  # fmt: skip


@functools.lru_cache(maxsize=1024)
def _cached_geometry(stride, padding, dilation) -> ConvGeometry:
    return ConvGeometry._validated(stride, padding, dilation)


def output_memory_format(input: torch.Tensor) -> torch.memory_format:
    """Outputs follow the input's layout, as ``F.conv2d`` does: channels_last in, channels_last out."""
    if not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def extension_arguments(layout: NestedLayout, geometry: ConvGeometry) -> tuple:
    """Layout and geometry as the compiled extension's functions take them (offsets, flat mask, pairs).

    Tuples as they are: the bindings copy any sequence into their vectors.
    """
    return (
        layout.in_offsets,
        layout.out_offsets,
        layout.flat_mask,
        geometry.stride,
        geometry.padding,
        geometry.dilation,
    )
