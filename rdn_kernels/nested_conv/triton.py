"""``triton`` backend: launchers and autotuned tile configurations of the fused Triton kernels.

The kernels (:mod:`rdn_kernels.nested_conv.triton_kernels`) are implicit GEMMs that walk only
the blocks of the mask; one launch computes every group of a stage. This module turns a
:class:`NestedLayout` into the small int32 tables the kernels scan, picks the accumulator and
``tl.dot`` precision for the dtype, and launches. CUDA tensors run compiled kernels; CPU tensors
run under ``TRITON_INTERPRET=1`` (decided when this module is imported, like ``triton.jit``).

The tile configurations are module-level constants (``FORWARD_CONFIGS``, ``GRAD_INPUT_CONFIGS``,
``GRAD_WEIGHT_CONFIGS``) so that ``tools/static_check_triton.py`` can compile each
one ahead of time for sm_90 and sm_80; a configuration that spills registers, overflows shared
memory or misses the tensor cores there is removed from these lists, not tolerated.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rdn_kernels import _memory
from rdn_kernels.backends import cudnn_conv_allows_tf32, triton_interpreted
from rdn_kernels.layout import NestedLayout

from .geometry import ConvGeometry, output_memory_format
from .triton_kernels import nested_conv_forward_kernel, nested_conv_grad_input_kernel, nested_conv_grad_weight_kernel

_HALF = ("bfloat16", "float16")
_ALL = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class TileConfig:
    """One tile configuration: the dot is (block_m × block_k) @ (block_k × block_n).

    ``dtypes`` are the tensor dtypes (torch names) it is offered for; float64 uses the float32 ones.
    ``min_align`` is the smallest CHANNEL_ALIGN (see ``triton_kernels``) it is offered for: some
    tiles only fit in registers when their loads are vectorised.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    dtypes: tuple[str, ...] = _ALL
    min_align: int = 1

    def to_triton(self) -> triton.Config:
        return triton.Config(
            {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k},
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages}"


# The forward and grad-input are the same GEMM shape (M = pixels, N and K = channels) and share
# their bf16/fp16 tiles. The static check decided these lists: the 128x128 tiles and the 4-warp
# tiles with 32 KiB of operands spill unless their loads are vectorised (min_align=8), and
# 128x32x64 on 4 warps spills in the 1×1 forward on sm_80.
_HALF_PIXEL_TILES = (
    TileConfig(128, 128, 32, 8, 3, _HALF, min_align=8),
    TileConfig(128, 128, 64, 8, 3, _HALF, min_align=8),
    TileConfig(128, 64, 32, 8, 3, _HALF),
    TileConfig(64, 128, 32, 8, 3, _HALF),
    TileConfig(128, 32, 32, 4, 4, _HALF, min_align=8),
    TileConfig(64, 64, 64, 4, 3, _HALF, min_align=8),
    TileConfig(64, 64, 32, 4, 3, _HALF),
    TileConfig(64, 32, 32, 4, 3, _HALF),
)
# fp32 and TF32 tiles spill easily (ptxas spills a few bytes even at 64-128 registers), so the
# surviving ones differ between the two kernels.
_FP32 = ("float32",)
# M = output pixels, N = output channels, K = input channels.
FORWARD_CONFIGS: tuple[TileConfig, ...] = (
    *_HALF_PIXEL_TILES,
    TileConfig(128, 64, 16, 8, 3, _FP32),
    TileConfig(64, 64, 16, 8, 2, _FP32, min_align=8),
    TileConfig(64, 64, 16, 4, 3, _FP32, min_align=8),
)
# M = input pixels of one stride phase, N = input channels, K = output channels.
GRAD_INPUT_CONFIGS: tuple[TileConfig, ...] = (
    *_HALF_PIXEL_TILES,
    TileConfig(128, 64, 16, 8, 3, _FP32),
    TileConfig(64, 128, 16, 8, 2, _FP32),
    TileConfig(64, 64, 16, 4, 2, _FP32),
)
# M = output channels, N = input channels, K = output pixels (the long reduction). Pruned by the
# static check: 64x64x64 with 4 warps spills on sm_80; 32x32 tiles get no wgmma on sm_90.
GRAD_WEIGHT_CONFIGS: tuple[TileConfig, ...] = (
    TileConfig(128, 128, 32, 8, 3, _HALF),
    TileConfig(128, 64, 64, 8, 3, _HALF),
    TileConfig(64, 64, 64, 8, 3, _HALF),
    TileConfig(128, 64, 32, 4, 4, _HALF),
    TileConfig(64, 64, 32, 4, 3),
    TileConfig(64, 64, 16, 4, 2, _FP32),
    TileConfig(64, 64, 32, 8, 3, _FP32),
)
# The interpreter runs on CPU where timing is meaningless; tiles smaller than any channel group
# of the tests make every kernel cross tile, run and chunk boundaries there.
INTERPRETER_CONFIG = TileConfig(16, 8, 8, 1, 1, (*_ALL, "float64"))


def _autotuned(kernel: triton.JITFunction, configs: tuple[TileConfig, ...], key: list[str], operand: str):
    """``triton.autotune`` over ``configs``, offering each only for its dtypes (of argument ``operand``)
    and channel alignments."""
    if triton_interpreted():
        configs = (INTERPRETER_CONFIG,)

    def offered(triton_configs, named_args, **kwargs):
        name = str(named_args[operand].dtype).removeprefix("torch.")
        name = "float32" if name == "float64" else name
        align = kwargs["CHANNEL_ALIGN"]
        # The autotuner passes its configs: the list built below, in the order of ``configs``.
        return [
            config
            for config, tile in zip(triton_configs, configs, strict=True)
            if name in tile.dtypes and align >= tile.min_align
        ]

    return triton.autotune(
        configs=[config.to_triton() for config in configs],
        # The offered configs depend on the alignment: it must be part of the cache key.
        key=[*key, "CHANNEL_ALIGN", "INPUT_PRECISION"],
        prune_configs_by={"early_config_prune": offered},
    )(kernel)


_forward = _autotuned(
    nested_conv_forward_kernel,
    FORWARD_CONFIGS,
    ["pixel_bucket", "in_channels", "out_channels", "kernel_h", "kernel_w", "x_stride_c"],
    "x_ptr",
)
_grad_input = _autotuned(
    nested_conv_grad_input_kernel,
    GRAD_INPUT_CONFIGS,
    ["pixel_bucket", "in_channels", "out_channels", "kernel_h", "kernel_w", "go_stride_c"],
    "go_ptr",
)


def pixel_bucket(num_pixels: int) -> int:
    """``num_pixels`` rounded up to a power of two: the autotuners' key instead of the exact count.

    The early-exit engine's batch shrinks at every exit; keyed on the exact pixel count the
    forward would re-tune (about a second per kernel and layer) for every remaining batch size.
    Within a factor of two the best tile rarely changes. (grad-weight keeps exact counts: training
    batches do not vary.)
    """
    return 1 << max(num_pixels - 1, 0).bit_length()


_grad_weight = _autotuned(
    nested_conv_grad_weight_kernel,
    GRAD_WEIGHT_CONFIGS,
    ["num_pixels", "pixels_per_split", "in_channels", "out_channels", "kernel_h", "kernel_w"],
    "x_ptr",
)


# ----------------------------------------------------------------------------------------------
# Host-side tables (cached per layout, stage and device: built and copied once)
# ----------------------------------------------------------------------------------------------


def _int32_table(rows: list[tuple[int, ...]], width: int, device: torch.device) -> torch.Tensor:
    # A one-row table of zeros stands in for an empty one: kernels never read past num_entries.
    return torch.tensor(rows or [(0,) * width], dtype=torch.int32, device=device)


def _segment_tables(segments: list[tuple[int, int, tuple]], device: torch.device):
    """(dst_start, dst_stop, runs) triples → the kernels' ``segments`` (S, 4), ``runs`` (R, 2) and
    the S segment sizes (for the grid, without reading the device tables back)."""
    rows, runs = [], []
    for dst_start, dst_stop, segment_runs in segments:
        rows.append((dst_start, dst_stop, len(runs), len(runs) + len(segment_runs)))
        runs.extend(segment_runs)
    sizes = tuple(dst_stop - dst_start for dst_start, dst_stop, _ in segments)
    return _int32_table(rows, 4, device), _int32_table(runs, 2, device), sizes


@functools.lru_cache(maxsize=1024)
def _forward_tables(layout: NestedLayout, lo: int, hi: int, device: torch.device):
    offsets = layout.out_offsets
    return _segment_tables(
        [(offsets[j], offsets[j + 1], layout.input_runs(j)) for j in range(lo, hi) if offsets[j + 1] > offsets[j]],
        device,
    )


@functools.lru_cache(maxsize=1024)
def _grad_input_tables(layout: NestedLayout, lo: int, hi: int, channels: int, device: torch.device):
    # Every input group present in the input gets a segment, also those no output reads: their
    # gradient is stored as zeros by the kernel, so grad_input needs no separate fill.
    offsets = layout.in_offsets
    return _segment_tables(
        [
            (offsets[i], offsets[i + 1], layout.output_runs(i, lo, hi))
            for i in range(layout.num_groups)
            if offsets[i] < offsets[i + 1] <= channels
        ],
        device,
    )


@functools.lru_cache(maxsize=1024)
def _grad_weight_blocks(layout: NestedLayout, lo: int, hi: int, device: torch.device):
    rows = [
        (layout.out_offsets[j], layout.out_offsets[j + 1], ci_start, ci_stop)
        for j in range(lo, hi)
        if layout.out_splits[j] > 0
        for ci_start, ci_stop in layout.input_runs(j)
    ]
    return _int32_table(rows, 4, device), rows


def _phase_taps(phase: int, stride: int, padding: int, dilation: int, kernel: int) -> tuple[int, int]:
    """(first tap, tap count) landing on whole output pixels for input rows ≡ phase (mod stride)."""
    taps = [r for r in range(kernel) if (phase + padding - r * dilation) % stride == 0]
    return (taps[0] if taps else 0), len(taps)


@functools.lru_cache(maxsize=256)
def _phase_table(geometry: ConvGeometry, kernel_size: tuple[int, int], device: torch.device):
    (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w) = geometry.stride, geometry.padding, geometry.dilation
    rows_h = [_phase_taps(a, stride_h, pad_h, dil_h, kernel_size[0]) for a in range(stride_h)]
    rows_w = [_phase_taps(b, stride_w, pad_w, dil_w, kernel_size[1]) for b in range(stride_w)]
    rows = [(*taps_h, *taps_w) for taps_h in rows_h for taps_w in rows_w]
    # Valid taps of a phase are spaced by stride / gcd(stride, dilation).
    steps = (stride_h // math.gcd(stride_h, dil_h), stride_w // math.gcd(stride_w, dil_w))
    return _int32_table(rows, 4, device), steps


# ----------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------


def _channel_alignment(layout: NestedLayout) -> int:
    """Largest power of two (at most 16) dividing every channel offset: the kernels' CHANNEL_ALIGN hint."""
    offsets = (*layout.in_offsets, *layout.out_offsets)
    return next(align for align in (16, 8, 4, 2, 1) if all(offset % align == 0 for offset in offsets))


def _kernel_options(layout: NestedLayout, dtype: torch.dtype, device: torch.device) -> dict:
    """Compile-time options shared by the three kernels: channel alignment, accumulator dtype and
    ``tl.dot`` precision (fp32 accumulation; TF32 when torch lets cuDNN convolutions use it,
    :func:`~rdn_kernels.backends.cudnn_conv_allows_tf32`, on by default: the op is a convolution
    and follows the precision a dense one gets under the same flags, as the CUDA backend does)."""
    use_tf32 = dtype == torch.float32 and device.type == "cuda" and cudnn_conv_allows_tf32()
    return {
        "CHANNEL_ALIGN": _channel_alignment(layout),
        "ACC_DTYPE": tl.float64 if dtype == torch.float64 else tl.float32,
        "INPUT_PRECISION": "tf32" if use_tf32 else "ieee",
    }


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_int32_extent(name: str, tensor: torch.Tensor, first_dim: int = 1) -> None:
    """Kernels address one image (dims 1..3) and the whole weight (first_dim=0) in int32; batch offsets are int64."""
    dims = range(first_dim, tensor.dim())
    extent = sum((tensor.shape[d] - 1) * abs(tensor.stride(d)) for d in dims if tensor.shape[d] > 0)
    if extent >= 2**31:
        raise ValueError(
            f"{name} spans {extent + 1} elements {'per sample ' if first_dim else ''}, more than the Triton "
            "kernels address in int32 (2**31 - 1); use backend='cuda' or 'torch', or split the batch"
        )


# The kernels index pixels in int32 and step past the last pixel by up to a tile, and grad-weight's
# last split ends up to 63 pixels past it (split · per_split + per_split, before the min with the
# pixel count): the pixel count keeps this margin below 2**31, or that sum would wrap and the split
# would silently add nothing.
_PIXEL_INDEX_LIMIT = 2**31 - 1024
# CUDA's limit on grid axes 1 and 2 (grad-input puts the stride phases on axis 1, grad-weight the taps).
_GRID_AXIS_LIMIT = 65535


def _check_extents(num_pixels: int, images: dict[str, torch.Tensor], weight: torch.Tensor) -> None:
    """Every launch's int32 limits: the pixel count, each image tensor per sample, the whole weight."""
    if num_pixels >= _PIXEL_INDEX_LIMIT:
        raise ValueError(f"N·H·W = {num_pixels} pixels exceed the triton kernels' int32 pixel indices "
                         f"(at most {_PIXEL_INDEX_LIMIT - 1}); split the batch")  # fmt: skip
    for name, tensor in images.items():
        _check_int32_extent(name, tensor)
    _check_int32_extent("weight", weight, first_dim=0)


def _check_grid_axis(what: str, count: int) -> None:
    if count > _GRID_AXIS_LIMIT:
        raise ValueError(
            f"{what} = {count} exceeds CUDA's {_GRID_AXIS_LIMIT} programs on a grid axis, which the triton backend "
            "launches them on; use backend='torch' or 'cuda' for this geometry"
        )


def _pixel_tile_grid(num_pixels: int, group_sizes, *rest: int):
    """Launch grid of the forward / grad-input kernels: (pixel tiles × channel tiles of every group, *rest)."""

    def grid(meta):
        channel_tiles = sum(triton.cdiv(size, meta["BLOCK_N"]) for size in group_sizes)
        return (triton.cdiv(num_pixels, meta["BLOCK_M"]) * channel_tiles, *rest)

    return grid


# ----------------------------------------------------------------------------------------------
# Backend interface
# ----------------------------------------------------------------------------------------------


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
    """Output groups lo..hi-1: (N, sum(out_splits[lo:hi]), H_out, W_out), or written into ``out``."""
    batch, _, height, width = input.shape
    kernel_h, kernel_w = weight.shape[2:]
    height_out, width_out = geometry.output_size(height, width, (kernel_h, kernel_w))
    if out is None:
        channels = layout.out_offsets[hi] - layout.out_offsets[lo]
        result = _memory.empty(
            (batch, channels, height_out, width_out),
            dtype=input.dtype,
            device=input.device,
            memory_format=output_memory_format(input),
        )
        channel_base = layout.out_offsets[lo]
    else:
        result, channel_base = out, 0
    segments, runs, group_sizes = _forward_tables(layout, lo, hi, input.device)
    num_pixels = batch * height_out * width_out
    if not group_sizes or num_pixels == 0:
        return result
    _check_extents(num_pixels, {"input": input, "output": result}, weight)
    grid = _pixel_tile_grid(num_pixels, group_sizes)

    with _device_guard(input.device):
        _forward[grid](
            input, weight, input if bias is None else bias, result, segments, runs,
            len(group_sizes), num_pixels, height, width, height_out, width_out, kernel_h, kernel_w,
            *geometry.stride, *geometry.padding, *geometry.dilation,
            *input.stride(), *weight.stride(), *result.stride(), channel_base,
            layout.in_offsets[hi], layout.out_offsets[hi] - layout.out_offsets[lo], pixel_bucket(num_pixels),
            HAS_BIAS=bias is not None,
            POINTWISE=(kernel_h, kernel_w) == (1, 1) and geometry.is_pointwise_identity,
            **_kernel_options(layout, input.dtype, input.device),
        )  # fmt: skip
    return result


def grad_input(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    layout: NestedLayout,
    geometry: ConvGeometry,
    lo: int,
    hi: int,
) -> torch.Tensor:
    """dL/d input, shaped like ``input``; zero on channels no output group of lo..hi-1 reads."""
    batch, channels, height, width = input.shape
    kernel_h, kernel_w = weight.shape[2:]
    height_out, width_out = grad_output.shape[2:]
    result = _memory.empty_like(input, memory_format=output_memory_format(input))
    segments, runs, group_sizes = _grad_input_tables(layout, lo, hi, channels, input.device)
    phases, (tap_step_h, tap_step_w) = _phase_table(geometry, (kernel_h, kernel_w), input.device)
    stride_h, stride_w = geometry.stride
    phase_height, phase_width = triton.cdiv(height, stride_h), triton.cdiv(width, stride_w)
    num_phase_pixels = batch * phase_height * phase_width
    if not group_sizes or num_phase_pixels == 0:
        return result.zero_()
    _check_extents(num_phase_pixels, {"grad_output": grad_output, "input": result}, weight)
    _check_grid_axis("stride_h · stride_w", stride_h * stride_w)
    grid = _pixel_tile_grid(num_phase_pixels, group_sizes, stride_h * stride_w)

    with _device_guard(input.device):
        _grad_input[grid](
            grad_output, weight, result, segments, runs, phases,
            len(group_sizes), num_phase_pixels, height, width, height_out, width_out, phase_height, phase_width,
            *geometry.stride, *geometry.padding, *geometry.dilation, tap_step_h, tap_step_w,
            *grad_output.stride(), layout.out_offsets[lo], *weight.stride(), *result.stride(),
            channels, grad_output.shape[1], kernel_h, kernel_w, pixel_bucket(num_phase_pixels),
            **_kernel_options(layout, input.dtype, input.device),
        )  # fmt: skip
    return result


def _default_pixel_splits(num_pixels: int, useful_weight_elements: int, weight: torch.Tensor) -> int:
    """Pixel splits for grad-weight: enough programs to fill the GPU when the weight is small.

    The partial sums take splits × weight.numel() fp32 elements, kept under 64 MiB.
    """
    if weight.device.type != "cuda":
        return 1
    sm_count = torch.cuda.get_device_properties(weight.device).multi_processor_count
    programs_per_split = max(1, useful_weight_elements // (64 * 64))
    splits = min(
        triton.cdiv(4 * sm_count, programs_per_split),
        triton.cdiv(num_pixels, 4096),
        max(1, (1 << 24) // max(1, weight.numel())),
        64,
    )
    return max(1, splits)


def grad_weight(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    layout: NestedLayout,
    geometry: ConvGeometry,
    lo: int,
    hi: int,
    num_splits: int | None = None,
) -> torch.Tensor:
    """dL/d weight, dense-shaped like ``weight``; exactly zero outside the mask blocks of rows lo..hi-1.

    ``num_splits`` cuts the pixel reduction into that many partial sums (default: a heuristic).
    """
    batch, _, height, width = input.shape
    kernel_h, kernel_w = weight.shape[2:]
    height_out, width_out = grad_output.shape[2:]
    num_pixels = batch * height_out * width_out
    blocks, rows = _grad_weight_blocks(layout, lo, hi, input.device)
    useful = sum((co_stop - co_start) * (ci_stop - ci_start) for co_start, co_stop, ci_start, ci_stop in rows)
    if not rows or num_pixels == 0:
        return torch.zeros_like(weight)
    _check_extents(num_pixels, {"grad_output": grad_output, "input": input}, weight)
    _check_grid_axis("kernel_h · kernel_w", kernel_h * kernel_w)
    if num_splits is None:
        num_splits = _default_pixel_splits(num_pixels, useful * kernel_h * kernel_w, weight)
    if num_splits == 1:
        target = torch.zeros_like(weight)
        split_stride, split_strides = 0, target.stride()
    else:
        accumulate = torch.float64 if weight.dtype == torch.float64 else torch.float32
        target = weight.new_zeros((num_splits, *weight.shape), dtype=accumulate)
        split_stride, split_strides = target.stride(0), target.stride()[1:]

    def grid(meta):
        tiles = sum(
            triton.cdiv(co_stop - co_start, meta["BLOCK_M"]) * triton.cdiv(ci_stop - ci_start, meta["BLOCK_N"])
            for co_start, co_stop, ci_start, ci_stop in rows
        )
        return (tiles, kernel_h * kernel_w, num_splits)

    with _device_guard(input.device):
        _grad_weight[grid](
            input, grad_output, target, blocks,
            len(rows), num_pixels, triton.cdiv(num_pixels, num_splits), height, width, height_out, width_out, kernel_w,
            *geometry.stride, *geometry.padding, *geometry.dilation,
            *input.stride(), *grad_output.stride(), layout.out_offsets[lo],
            split_stride, *split_strides,
            input.shape[1], grad_output.shape[1], kernel_h,
            **_kernel_options(layout, input.dtype, input.device),
        )  # fmt: skip
    return target if num_splits == 1 else target.sum(0).to(weight.dtype)


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
    """(grad_input | None, grad_weight | None, grad_bias | None) of the stage lo..hi-1."""
    grad_bias = None
    if has_bias:
        grad_bias = weight.new_zeros(weight.shape[0])
        grad_bias[layout.out_offsets[lo] : layout.out_offsets[hi]] = grad_output.sum(dim=(0, 2, 3))
    return (
        grad_input(grad_output, input, weight, layout, geometry, lo, hi) if needs_input else None,
        grad_weight(grad_output, input, weight, layout, geometry, lo, hi) if needs_weight else None,
        grad_bias,
    )
