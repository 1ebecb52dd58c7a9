"""Triton kernels of the nested convolution: forward, grad-input and grad-weight as implicit GEMMs.

Every kernel walks only the blocks of the mask. The structure reaches a kernel as small int32
tables built by the launchers (:mod:`rdn_kernels.nested_conv.triton`):

- ``segments`` (S, 4): one row per destination channel group, ``(dst_start, dst_stop,
  run_first, run_stop)``; rows ``run_first..run_stop-1`` of ``runs`` (R, 2) are the source
  channel ranges ``(src_start, src_stop)`` the group reduces over. The forward's destinations
  are output groups (sources: ``layout.input_runs``), grad-input's are input groups (sources:
  ``layout.output_runs``).
- ``blocks`` (B, 4): ``(co_start, co_stop, ci_start, ci_stop)`` rectangles of the weight that
  grad-weight fills.

Program ids are mapped to tiles by scanning these tables (K is small, so a scalar scan costs
less than a launch), so one launch covers every group of the stage whatever the tile sizes of
the autotuned config. Tiles use the GEMM names: the dot product is (BLOCK_M × BLOCK_K) @
(BLOCK_K × BLOCK_N) accumulated in ACC_DTYPE (fp32, or fp64 for fp64 tensors).

CHANNEL_ALIGN is a power of two dividing every channel offset of the layout (and the channel
base): the ``tl.multiple_of`` hints it gives let channels_last tiles load as 16-byte vectors,
which is what allows the loads to be pipelined through shared memory (cp.async). Without the
hint the loads stay scalar and unpipelined (measured on sm_90: 240 instead of 80 registers for a
64×32×32 bf16 forward tile). The hints sit on the channel-offset vectors themselves: on a scalar
tile start that comes out of the table scan they are lost (which left grad-weight unpipelined).

Offsets: a pixel's batch term ``n * stride_n`` is computed in int64 (the launchers check that one
image fits in int32), so tensors larger than 2**31 elements are addressed correctly.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _locate_tile(tile, table_ptr, num_entries, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, TILE_B: tl.constexpr):
    """Find the tile-th tile of a (num_entries, 4) table whose rows are ``(a_start, a_stop, b_start, b_stop)``.

    Each row is cut into cdiv(a_stop - a_start, BLOCK_A) tiles along a (times cdiv(b_stop -
    b_start, BLOCK_B) along b when TILE_B). Returns (row, a tile start, b tile start).
    """
    row = tl.full((), 0, tl.int32)
    a_tile_start = tl.full((), 0, tl.int32)
    b_tile_start = tl.full((), 0, tl.int32)
    first = tl.full((), 0, tl.int32)
    for entry in range(num_entries):
        a_start = tl.load(table_ptr + 4 * entry)
        a_stop = tl.load(table_ptr + 4 * entry + 1)
        b_start = tl.load(table_ptr + 4 * entry + 2)
        tiles_a = tl.cdiv(a_stop - a_start, BLOCK_A)
        if TILE_B:
            tiles_b = tl.cdiv(tl.load(table_ptr + 4 * entry + 3) - b_start, BLOCK_B)
        else:
            tiles_b = 1
        local = tile - first
        hit = (local >= 0) & (local < tiles_a * tiles_b)
        row = tl.where(hit, entry, row)
        a_tile_start = tl.where(hit, a_start + (local // tiles_b) * BLOCK_A, a_tile_start)
        b_tile_start = tl.where(hit, b_start + (local % tiles_b) * BLOCK_B, b_tile_start)
        first += tiles_a * tiles_b
    return row, a_tile_start, b_tile_start


@triton.jit
def _count_tiles(table_ptr, num_entries, BLOCK_A: tl.constexpr):
    """Total tiles of a segment table cut along a only."""
    total = tl.full((), 0, tl.int32)
    for entry in range(num_entries):
        total += tl.cdiv(tl.load(table_ptr + 4 * entry + 1) - tl.load(table_ptr + 4 * entry), BLOCK_A)
    return total


@triton.jit
def _aligned_channel_base(base, CHANNEL_ALIGN: tl.constexpr):
    """``base`` (a channel offset argument) with the alignment hint, where the hint can hold.

    The JIT turns an int argument equal to 1 into a compile-time constant, which ``tl.multiple_of``
    refuses; a base of 1 only occurs with CHANNEL_ALIGN == 1, where the hint would say nothing.
    """
    if CHANNEL_ALIGN > 1:
        base = tl.multiple_of(base, CHANNEL_ALIGN)
    return base


@triton.jit
def nested_conv_forward_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, segments_ptr, runs_ptr,
    num_segments, num_pixels, height, width, height_out, width_out, kernel_h, kernel_w,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    w_stride_o, w_stride_i, w_stride_h, w_stride_w,
    y_stride_n, y_stride_c, y_stride_h, y_stride_w, y_channel_base,
    in_channels, out_channels, pixel_bucket,
    HAS_BIAS: tl.constexpr, POINTWISE: tl.constexpr, CHANNEL_ALIGN: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Y[:, co] = Σ over the input runs of co's group and the kernel taps of X ⋆ W, + bias.

    M = output pixels (N·H_out·W_out), N = output channels of the segment, K = input channels.
    ``y_channel_base`` is subtracted from absolute output channels: 0 when writing into the full
    ``out`` buffer, ``out_offsets[lo]`` for a stage-shaped result. ``in_channels``,
    ``out_channels`` and ``pixel_bucket`` (``num_pixels`` rounded up to a power of two) only key
    the autotuner. POINTWISE: 1×1, stride 1, no padding (no bounds).
    """
    # Output-channel tiles vary fastest so that programs running together share the input tile.
    num_channel_tiles = _count_tiles(segments_ptr, num_segments, BLOCK_N)
    pid = tl.program_id(0)
    channel_tile = pid % num_channel_tiles
    pixel_tile = pid // num_channel_tiles
    segment, co_start, _ = _locate_tile(channel_tile, segments_ptr, num_segments, BLOCK_N, 1, False)
    co_stop = tl.multiple_of(tl.load(segments_ptr + 4 * segment + 1), CHANNEL_ALIGN)
    y_channel_base = _aligned_channel_base(y_channel_base, CHANNEL_ALIGN)
    run_first = tl.load(segments_ptr + 4 * segment + 2)
    run_stop = tl.load(segments_ptr + 4 * segment + 3)

    offs_m = pixel_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    pixel_valid = offs_m < num_pixels
    n = offs_m // (height_out * width_out)
    oh = (offs_m // width_out) % height_out
    ow = offs_m % width_out
    x_image = n.to(tl.int64) * x_stride_n
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    offs_n = tl.multiple_of(co_start + tl.arange(0, BLOCK_N), CHANNEL_ALIGN)
    co_valid = offs_n < co_stop
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for run in range(run_first, run_stop):
        ci_start = tl.multiple_of(tl.load(runs_ptr + 2 * run), CHANNEL_ALIGN)
        ci_stop = tl.multiple_of(tl.load(runs_ptr + 2 * run + 1), CHANNEL_ALIGN)
        num_chunks = tl.cdiv(ci_stop - ci_start, BLOCK_K)
        # One flat loop over (tap, channel chunk) so the pipeliner overlaps loads across taps.
        for step in range(0, kernel_h * kernel_w * num_chunks):
            tap = step // num_chunks
            r = tap // kernel_w
            s = tap % kernel_w
            ci = tl.multiple_of(ci_start + (step % num_chunks) * BLOCK_K + offs_k, CHANNEL_ALIGN)
            ci_valid = ci < ci_stop
            if POINTWISE:
                ih = oh
                iw = ow
                x_valid = pixel_valid
            else:
                ih = ih0 + r * dil_h
                iw = iw0 + s * dil_w
                x_valid = pixel_valid & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
            x_pixel = x_image + ih * x_stride_h + iw * x_stride_w
            x_tile = tl.load(
                x_ptr + x_pixel[:, None] + (ci * x_stride_c)[None, :],
                mask=x_valid[:, None] & ci_valid[None, :],
                other=0.0,
            )
            w_tile = tl.load(
                w_ptr + (ci * w_stride_i)[:, None] + (offs_n * w_stride_o)[None, :] + r * w_stride_h + s * w_stride_w,
                mask=ci_valid[:, None] & co_valid[None, :],
                other=0.0,
            )
            acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=co_valid, other=0.0).to(ACC_DTYPE)[None, :]
    y_pixel = n.to(tl.int64) * y_stride_n + oh * y_stride_h + ow * y_stride_w
    tl.store(
        y_ptr + y_pixel[:, None] + ((offs_n - y_channel_base) * y_stride_c)[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=pixel_valid[:, None] & co_valid[None, :],
    )


@triton.jit
def nested_conv_grad_input_kernel(
    go_ptr, w_ptr, gx_ptr, segments_ptr, runs_ptr, phases_ptr,
    num_segments, num_phase_pixels, height, width, height_out, width_out, phase_height, phase_width,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, tap_step_h, tap_step_w,
    go_stride_n, go_stride_c, go_stride_h, go_stride_w, go_channel_base,
    w_stride_o, w_stride_i, w_stride_h, w_stride_w,
    gx_stride_n, gx_stride_c, gx_stride_h, gx_stride_w,
    in_channels, out_channels, kernel_h, kernel_w, pixel_bucket,
    CHANNEL_ALIGN: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dX[:, ci] = Σ over the output runs reading ci's group and the valid taps of dY ⋆ Wᵀ.

    M = input pixels of one stride phase, N = input channels of the segment, K = output channels.
    Program axis 1 is the stride phase (ih % stride_h, iw % stride_w): within a phase the same
    taps land on whole output pixels for every pixel, so only those taps are visited. Row p of
    ``phases`` (P, 4) is ``(first tap row, tap rows, first tap column, tap columns)``; the taps of
    a phase are first + t·tap_step. Segments without runs and phases without taps store zeros,
    so every element of dX is written. ``in_channels``, ``out_channels``, ``kernel_h``,
    ``kernel_w`` and ``pixel_bucket`` only key the autotuner.
    """
    num_channel_tiles = _count_tiles(segments_ptr, num_segments, BLOCK_N)
    pid = tl.program_id(0)
    phase = tl.program_id(1)
    channel_tile = pid % num_channel_tiles
    pixel_tile = pid // num_channel_tiles
    segment, ci_start, _ = _locate_tile(channel_tile, segments_ptr, num_segments, BLOCK_N, 1, False)
    ci_stop = tl.multiple_of(tl.load(segments_ptr + 4 * segment + 1), CHANNEL_ALIGN)
    go_channel_base = _aligned_channel_base(go_channel_base, CHANNEL_ALIGN)
    run_first = tl.load(segments_ptr + 4 * segment + 2)
    run_stop = tl.load(segments_ptr + 4 * segment + 3)
    phase_h = phase // stride_w
    phase_w = phase % stride_w
    r_first = tl.load(phases_ptr + 4 * phase)
    r_count = tl.load(phases_ptr + 4 * phase + 1)
    s_first = tl.load(phases_ptr + 4 * phase + 2)
    s_count = tl.load(phases_ptr + 4 * phase + 3)

    offs_m = pixel_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    n = offs_m // (phase_height * phase_width)
    qh = (offs_m // phase_width) % phase_height
    qw = offs_m % phase_width
    ih = qh * stride_h + phase_h
    iw = qw * stride_w + phase_w
    pixel_valid = (offs_m < num_phase_pixels) & (ih < height) & (iw < width)
    go_image = n.to(tl.int64) * go_stride_n
    offs_n = tl.multiple_of(ci_start + tl.arange(0, BLOCK_N), CHANNEL_ALIGN)
    ci_valid = offs_n < ci_stop
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for run in range(run_first, run_stop):
        co_start = tl.multiple_of(tl.load(runs_ptr + 2 * run), CHANNEL_ALIGN)
        co_stop = tl.multiple_of(tl.load(runs_ptr + 2 * run + 1), CHANNEL_ALIGN)
        num_chunks = tl.cdiv(co_stop - co_start, BLOCK_K)
        for step in range(0, r_count * s_count * num_chunks):
            tap = step // num_chunks
            r = r_first + (tap // s_count) * tap_step_h
            s = s_first + (tap % s_count) * tap_step_w
            # ih = oh·stride - pad + r·dil, and the phase makes the division exact.
            oh = qh + (phase_h + pad_h - r * dil_h) // stride_h
            ow = qw + (phase_w + pad_w - s * dil_w) // stride_w
            go_valid = pixel_valid & (oh >= 0) & (oh < height_out) & (ow >= 0) & (ow < width_out)
            co = tl.multiple_of(co_start + (step % num_chunks) * BLOCK_K + offs_k, CHANNEL_ALIGN)
            co_valid = co < co_stop
            go_pixel = go_image + oh * go_stride_h + ow * go_stride_w
            go_tile = tl.load(
                go_ptr + go_pixel[:, None] + ((co - go_channel_base) * go_stride_c)[None, :],
                mask=go_valid[:, None] & co_valid[None, :],
                other=0.0,
            )
            w_tile = tl.load(
                w_ptr + (co * w_stride_o)[:, None] + (offs_n * w_stride_i)[None, :] + r * w_stride_h + s * w_stride_w,
                mask=co_valid[:, None] & ci_valid[None, :],
                other=0.0,
            )
            acc = tl.dot(go_tile, w_tile, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    gx_pixel = n.to(tl.int64) * gx_stride_n + ih * gx_stride_h + iw * gx_stride_w
    tl.store(
        gx_ptr + gx_pixel[:, None] + (offs_n * gx_stride_c)[None, :],
        acc.to(gx_ptr.dtype.element_ty),
        mask=pixel_valid[:, None] & ci_valid[None, :],
    )


@triton.jit
def nested_conv_grad_weight_kernel(
    x_ptr, go_ptr, gw_ptr, blocks_ptr,
    num_blocks, num_pixels, pixels_per_split, height, width, height_out, width_out, kernel_w,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    go_stride_n, go_stride_c, go_stride_h, go_stride_w, go_channel_base,
    gw_stride_split, gw_stride_o, gw_stride_i, gw_stride_h, gw_stride_w,
    in_channels, out_channels, kernel_h,
    CHANNEL_ALIGN: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dW[co, ci, r, s] = Σ over output pixels of dY[:, co] · X[:, ci] at the tap's input pixel.

    M = output channels, N = input channels (a tile of one mask block rectangle), K = output
    pixels. Program axes: (block tile, tap r·kernel_w + s, pixel split). Split ``k`` reduces pixels
    [k·pixels_per_split, (k+1)·pixels_per_split) into slice k of ``gw`` (``gw_stride_split``
    apart); the launcher sums the slices. Entries outside the blocks are never written.
    ``in_channels``, ``out_channels``, ``kernel_h`` only key the autotuner.
    """
    tap = tl.program_id(1)
    split = tl.program_id(2)
    block, co_start, ci_start = _locate_tile(tl.program_id(0), blocks_ptr, num_blocks, BLOCK_M, BLOCK_N, True)
    co_stop = tl.multiple_of(tl.load(blocks_ptr + 4 * block + 1), CHANNEL_ALIGN)
    ci_stop = tl.multiple_of(tl.load(blocks_ptr + 4 * block + 3), CHANNEL_ALIGN)
    go_channel_base = _aligned_channel_base(go_channel_base, CHANNEL_ALIGN)
    r = tap // kernel_w
    s = tap % kernel_w

    offs_m = tl.multiple_of(co_start + tl.arange(0, BLOCK_M), CHANNEL_ALIGN)
    co_valid = offs_m < co_stop
    offs_n = tl.multiple_of(ci_start + tl.arange(0, BLOCK_N), CHANNEL_ALIGN)
    ci_valid = offs_n < ci_stop
    pixel_start = split * pixels_per_split
    pixel_stop = tl.minimum(pixel_start + pixels_per_split, num_pixels)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for pixel_chunk in range(pixel_start, pixel_stop, BLOCK_K):
        offs_k = pixel_chunk + tl.arange(0, BLOCK_K)
        pixel_valid = offs_k < pixel_stop
        n = (offs_k // (height_out * width_out)).to(tl.int64)
        oh = (offs_k // width_out) % height_out
        ow = offs_k % width_out
        ih = oh * stride_h - pad_h + r * dil_h
        iw = ow * stride_w - pad_w + s * dil_w
        x_valid = pixel_valid & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
        go_tile = tl.load(
            go_ptr
            + ((offs_m - go_channel_base) * go_stride_c)[:, None]
            + (n * go_stride_n + oh * go_stride_h + ow * go_stride_w)[None, :],
            mask=co_valid[:, None] & pixel_valid[None, :],
            other=0.0,
        )
        x_tile = tl.load(
            x_ptr + (n * x_stride_n + ih * x_stride_h + iw * x_stride_w)[:, None] + (offs_n * x_stride_c)[None, :],
            mask=x_valid[:, None] & ci_valid[None, :],
            other=0.0,
        )
        acc = tl.dot(go_tile, x_tile, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    gw_offsets = (
        split.to(tl.int64) * gw_stride_split
        + (offs_m * gw_stride_o)[:, None]
        + (offs_n * gw_stride_i)[None, :]
        + r * gw_stride_h
        + s * gw_stride_w
    )
    tl.store(gw_ptr + gw_offsets, acc.to(gw_ptr.dtype.element_ty), mask=co_valid[:, None] & ci_valid[None, :])
