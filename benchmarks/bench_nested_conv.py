"""Nested conv / linear kernel benchmark: our backends against the baselines, on the same tensors.

    rdn-bench-kernels --device cpu|cuda [--quick] [--modes forward,stage,backward] [--out benchmarks/results]
    rdn-bench-kernels --shape C,D,H,W,k[,stride] [--k 4] [--batch 16] [--dtypes fp32] [--channels-last]

``rdn-bench-kernels`` is the console script the package installs (``pip install -e .``, ``make
install``); ``python -m benchmarks.bench_nested_conv`` is the same command.

Every case (layer, batch, K, dtype, mode) times, in one measurement on the same tensors
(DESIGN.md §2, "How kernel speed is judged"):

- ours: every backend ``rdn_kernels.available_backends(device)`` lists (``cpp``, ``torch`` on a
  CPU; ``triton``, ``cuda``, ``torch`` on a GPU);
- the baselines a user could write without this package:
  *masked dense* — one conv with W ⊙ M (the masked copy is made outside the timed region);
  *per-stage loop* — one conv per output group on contiguous weight slices (made outside the
  timed region, as a model storing one parameter per stage would hold them) and input slices,
  then a concatenation;
  *block sparse (BSR)* — ``torch.sparse`` with only the triangle's blocks stored, times the input
  as a (C·k², N·H·W) matrix (on a GPU Triton's ``bsr_dense_mm`` where it applies); see
  :func:`_block_sparse`. torch.sparse is beta: its failure is reported in the row, not raised;
- the reference points: *dense* (the full conv, structure ignored) and *grouped* (groups = K,
  block-diagonal; only when K divides C and D);
- the ideals: FLOP-ideal = dense time × useful fraction, and on a known GPU the roofline
  (:mod:`benchmarks.roofline`).

Modes:

- ``forward``: all K groups.
- ``stage``: output group s alone, ``stages=(s, s+1)`` with ``out=`` into a preallocated full
  output, reading input groups <= s. Its baseline is the per-stage loop restricted to that stage
  (one conv on the stage's input prefix and weight rows, returning the stage's channels, no copy
  into a buffer). For the full lower-triangular mask, masked dense restricted to the stage's rows
  is that same conv, so it is not timed twice. Reference points: the dense conv of the whole
  layer (the FLOP-ideal's yardstick) and, as "grouped", the stage's diagonal block alone.
- ``backward``: forward + gradients of input and weight, through ``torch.autograd.grad``.
  Masked dense multiplies the mask inside the graph (W · M, so that the weight gradient is
  masked too); the per-stage loop differentiates its per-stage weight slices.

Each implementation's output (or gradients) is first compared with the first baseline evaluated
in float64; a mismatch is reported as status ``wrong`` and kept out of "best of ours".
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import groupby
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks import roofline
from benchmarks.harness import (
    CHECK_TOLERANCE,
    TIMING_PRESETS,
    TimingConfig,
    device_tag,
    machine_info,
    measure,
    relative_error,
)
from benchmarks.report import best_ours_vs_best_baseline, write_csv, write_reports
from benchmarks.shapes import MODES, PLAN_NAMES, Case, LayerShape, Plan, plan
from rdn_kernels import available_backends, nested_conv2d, nested_linear
from rdn_kernels.backends import KNOWN_BACKENDS
from rdn_kernels.layout import NestedLayout


@dataclass(frozen=True)
class Operands:
    """The tensors every case of one (layer, batch, K, dtype) group runs on.

    input (N, C, H, W) or (N, C); weight (D, C, k, k) or (D, C); mask: weight-shaped 0/1 of the
    block mask; grad_output: the full output's gradient (N, D, H_out, W_out) or (N, D).
    """

    layer: LayerShape
    layout: NestedLayout
    input: Tensor
    weight: Tensor
    mask: Tensor
    grad_output: Tensor

    def to(self, dtype: torch.dtype) -> Operands:
        return replace(self, input=self.input.to(dtype), weight=self.weight.to(dtype), mask=self.mask.to(dtype),
                       grad_output=self.grad_output.to(dtype))


def make_operands(case: Case, device: torch.device, memory_format: torch.memory_format, seed: int = 0) -> Operands:
    """Seeded random operands of ``case``'s layer, batch, K and dtype (weights scaled by 1/sqrt(fan-in))."""
    layer, layout = case.layer, case.layout
    generator = torch.Generator().manual_seed(seed)
    height_out, width_out = layer.output_size
    spatial_in = () if layer.is_linear else (layer.height, layer.width)
    spatial_out = () if layer.is_linear else (height_out, width_out)
    kernel = () if layer.is_linear else (layer.kernel, layer.kernel)
    fan_in = layer.in_channels * layer.kernel**2

    def random(*shape: int, scale: float = 1.0) -> Tensor:
        # Drawn on the CPU so every device sees the same numbers; unit-scale outputs.
        return (torch.randn(shape, generator=generator) * scale).to(device=device, dtype=case.dtype)

    block_mask = torch.zeros(layer.out_channels, layer.in_channels)
    for j, row in enumerate(layout.mask):
        for i, present in enumerate(row):
            if present:
                block_mask[layout.out_offsets[j] : layout.out_offsets[j + 1],
                           layout.in_offsets[i] : layout.in_offsets[i + 1]] = 1
    input = random(case.batch, layer.in_channels, *spatial_in)
    grad_output = random(case.batch, layer.out_channels, *spatial_out)
    if not layer.is_linear:
        input = input.contiguous(memory_format=memory_format)
        grad_output = grad_output.contiguous(memory_format=memory_format)
    return Operands(
        layer=layer,
        layout=layout,
        input=input,
        weight=random(layer.out_channels, layer.in_channels, *kernel, scale=fan_in**-0.5),
        mask=block_mask.view(*block_mask.shape, *(1,) * len(kernel)).expand(-1, -1, *kernel).to(device, case.dtype),
        grad_output=grad_output,
    )


# ----------------------------------------------------------------------------------------------
# The implementations a case times
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Implementation:
    """One timed callable. ``result`` maps what ``run`` returns to the tensors the check compares
    (forward: the output; stage: the stage's channels; backward: grad_input and a dense-shaped
    grad_weight); None for reference points, which compute something else. ``unavailable`` is the
    reason a reference point does not apply (then nothing is timed)."""

    name: str
    role: str
    run: Callable[[], object] | None
    result: Callable[[object], tuple[Tensor, ...]] | None = None
    unavailable: str | None = None
    fallible: bool = False  # a failure is reported as the row's status (ours, and library paths in beta)


def _conv(layer: LayerShape, input: Tensor, weight: Tensor, groups: int = 1) -> Tensor:
    """PyTorch's own op for the layer: ``F.conv2d`` (``F.linear`` for a linear layer)."""
    if not layer.is_linear:
        return F.conv2d(input, weight, None, layer.stride, layer.padding, 1, groups)
    if groups == 1:
        return F.linear(input, weight)
    return F.conv2d(input[:, :, None, None], weight[:, :, None, None], groups=groups).flatten(1)


def _group_pieces(ops: Operands, group: int, requires_grad: bool = False) -> list[tuple[tuple[int, int], Tensor]]:
    """(input run, contiguous weight block) pairs that output group ``group`` reads."""
    rows = slice(ops.layout.out_offsets[group], ops.layout.out_offsets[group + 1])
    return [((start, stop), ops.weight[rows, start:stop].detach().clone().requires_grad_(requires_grad))
            for start, stop in ops.layout.input_runs(group)]


def _group_output(layer: LayerShape, input: Tensor, pieces) -> Tensor:
    output = None
    for (start, stop), block in pieces:
        part = _conv(layer, input[:, start:stop], block)
        output = part if output is None else output + part
    return output


def _stage_channels(ops: Operands, lo: int, hi: int, tensor: Tensor) -> Tensor:
    return tensor[:, ops.layout.out_offsets[lo] : ops.layout.out_offsets[hi]]


def _ours(case: Case, ops: Operands, backend: str) -> Implementation:
    layer, layout = case.layer, ops.layout
    lo, hi = case.stages
    op = nested_linear if layer.is_linear else nested_conv2d
    geometry = {} if layer.is_linear else {"stride": layer.stride, "padding": layer.padding}

    def call(input: Tensor, weight: Tensor, **extra) -> Tensor:
        return op(input, weight, in_splits=layout.in_splits, out_splits=layout.out_splits, backend=backend,
                  **geometry, **extra)

    if case.mode == "forward":
        return Implementation(backend, "ours", lambda: call(ops.input, ops.weight), lambda y: (y,))
    if case.mode == "stage":
        out = torch.zeros_like(ops.grad_output)
        return Implementation(backend, "ours", lambda: call(ops.input, ops.weight, stages=(lo, hi), out=out),
                              lambda y: (_stage_channels(ops, lo, hi, y),))
    input, weight = ops.input.detach().requires_grad_(), ops.weight.detach().requires_grad_()
    return Implementation(
        backend, "ours", lambda: torch.autograd.grad(call(input, weight), (input, weight), ops.grad_output), tuple
    )


def _baselines(case: Case, ops: Operands) -> list[Implementation]:
    """The correct implementations a user could write with PyTorch alone; the first is the check's reference."""
    layer, layout = case.layer, ops.layout
    groups = range(layout.num_groups)
    if case.mode == "forward":
        masked_weight = ops.weight * ops.mask
        pieces = [_group_pieces(ops, j) for j in groups]
        return [
            Implementation("masked dense", "baseline", lambda: _conv(layer, ops.input, masked_weight), lambda y: (y,)),
            Implementation("per-stage loop", "baseline",
                           lambda: torch.cat([_group_output(layer, ops.input, p) for p in pieces], dim=1),
                           lambda y: (y,)),
        ]
    if case.mode == "stage":
        stage_pieces = _group_pieces(ops, case.stage)
        return [Implementation("per-stage loop", "baseline", lambda: _group_output(layer, ops.input, stage_pieces),
                               lambda y: (y,))]
    input, weight = ops.input.detach().requires_grad_(), ops.weight.detach().requires_grad_()
    pieces = [_group_pieces(ops, j, requires_grad=True) for j in groups]
    blocks = [block for group in pieces for _, block in group]

    def per_stage_loop():
        output = torch.cat([_group_output(layer, input, p) for p in pieces], dim=1)
        return torch.autograd.grad(output, (input, *blocks), ops.grad_output)

    def per_stage_result(grads):
        grad_weight = torch.zeros_like(ops.weight)
        block_grads = iter(grads[1:])
        for j, group in zip(groups, pieces, strict=True):
            for (start, stop), _ in group:
                grad_weight[layout.out_offsets[j] : layout.out_offsets[j + 1], start:stop] = next(block_grads)
        return grads[0], grad_weight

    return [
        Implementation(
            "masked dense", "baseline",
            lambda: torch.autograd.grad(_conv(layer, input, weight * ops.mask), (input, weight), ops.grad_output),
            tuple,
        ),
        Implementation("per-stage loop", "baseline", per_stage_loop, per_stage_result),
    ]


def _grouped_weight(ops: Operands, lo: int, hi: int) -> Tensor:
    """The diagonal blocks W[j, j] of groups lo..hi-1, stacked as a grouped conv's weight."""
    layout = ops.layout
    return torch.cat([ops.weight[layout.out_offsets[j] : layout.out_offsets[j + 1],
                                 layout.in_offsets[j] : layout.in_offsets[j + 1]] for j in range(lo, hi)]).contiguous()


def _dense(case: Case, ops: Operands) -> Implementation:
    """The dense conv of the whole layer: structure ignored (and the FLOP-ideal's yardstick)."""
    layer = case.layer
    if case.mode != "backward":
        return Implementation("dense", "reference", lambda: _conv(layer, ops.input, ops.weight))
    input, weight = ops.input.detach().requires_grad_(), ops.weight.detach().requires_grad_()
    return Implementation(
        "dense", "reference",
        lambda: torch.autograd.grad(_conv(layer, input, weight), (input, weight), ops.grad_output),
    )


def _grouped(case: Case, ops: Operands) -> Implementation:
    """Groups = K (block-diagonal), the cheapest structured conv; for a stage its diagonal block alone."""
    layer, layout = case.layer, ops.layout
    num_groups = layout.num_groups
    if layer.in_channels % num_groups or layer.out_channels % num_groups:
        return Implementation("grouped", "reference", None, unavailable=f"n/a: K={num_groups} does not divide C and D")
    if case.mode == "stage":
        weight = _grouped_weight(ops, case.stage, case.stage + 1)
        start, stop = layout.in_offsets[case.stage], layout.in_offsets[case.stage + 1]
        return Implementation("grouped", "reference", lambda: _conv(layer, ops.input[:, start:stop], weight))
    if case.mode == "forward":
        weight = _grouped_weight(ops, 0, num_groups)
        return Implementation("grouped", "reference", lambda: _conv(layer, ops.input, weight, num_groups))
    input, weight = ops.input.detach().requires_grad_(), _grouped_weight(ops, 0, num_groups).requires_grad_()
    return Implementation(
        "grouped", "reference",
        lambda: torch.autograd.grad(_conv(layer, input, weight, num_groups), (input, weight), ops.grad_output),
    )


# ----------------------------------------------------------------------------------------------
# The block-sparse peer: torch.sparse with the triangle's blocks
# ----------------------------------------------------------------------------------------------

BLOCK_SPARSE = "block sparse (BSR)"


def _sparse(matrix: Tensor, block: int) -> Tensor:
    """``matrix`` with only its non-zero (block, block) blocks stored; CSR when block = 1."""
    with warnings.catch_warnings():  # "sparse ... support is in beta state", once per layout: known
        warnings.filterwarnings("ignore", message="Sparse (BSR|CSR) tensor support is in beta")
        return matrix.to_sparse_bsr((block, block)) if block > 1 else matrix.to_sparse_csr()


def _sparse_matmul(device: torch.device, block: int) -> Callable[[Tensor, Tensor], Tensor]:
    """sparse (M, K) @ dense (K, N): on a GPU Triton's ``bsr_dense_mm`` where its rules allow
    (power-of-two blocks >= 16, N divisible by 16), else cuSPARSE / MKL through ``torch.mm``."""
    if device.type == "cuda" and block >= 16 and block & (block - 1) == 0:
        try:
            from torch.sparse._triton_ops import bsr_dense_mm
        except ImportError:
            return torch.mm
        return lambda sparse, dense: (bsr_dense_mm if dense.shape[1] % 16 == 0 else torch.mm)(sparse, dense)
    return torch.mm


def _columns(layer: LayerShape, input: Tensor) -> Tensor:
    """The input as the (C · k², N · L) matrix that a (D, C · k²) weight multiplies: a view or a
    reshape for 1×1 stride 1 and linear layers, ``F.unfold`` (im2col) otherwise."""
    if layer.is_linear:
        return input.t()
    if layer.kernel == 1 and layer.stride == 1:
        return input.transpose(0, 1).reshape(input.shape[1], -1)
    unfolded = F.unfold(input, layer.kernel, padding=layer.padding, stride=layer.stride)  # (N, C·k², L)
    return unfolded.transpose(0, 1).reshape(unfolded.shape[1], -1)


def _from_columns(layer: LayerShape, columns: Tensor, like: Tensor) -> Tensor:
    """(channels, N · H_out · W_out) back to (N, channels, H_out, W_out) in ``like``'s memory format
    (``like``: any tensor of the layer's output size and layout); (N, channels) for a linear layer."""
    if layer.is_linear:
        return columns.t()
    batch, height_out, width_out = like.shape[0], *like.shape[2:]
    output = columns.view(columns.shape[0], batch, height_out, width_out).transpose(0, 1)
    return output.contiguous(memory_format=_memory_format(like))


def _memory_format(tensor: Tensor) -> torch.memory_format:
    channels_last = tensor.dim() == 4 and tensor.stride(1) == 1 and tensor.shape[1] > 1
    return torch.channels_last if channels_last else torch.contiguous_format


def _block_sparse(case: Case, ops: Operands) -> Implementation:
    """The peer a performance engineer tries next: the layer as a sparse matrix product that stores
    only the triangle's blocks (BSR with the largest square block dividing every group's (d_j, c_i·k²)
    block — MKL's CPU BSR takes square blocks only — or CSR when that is 1), times the input as columns.

    The sparse weights (and, in backward mode, the transposed one and the mask's CSR pattern) are
    built outside the timed region, like masked dense's masked copy. Backward: torch.sparse has no
    autograd for BSR on the CPU, so the gradients are written out: grad_input = Wᵀ · G (then
    ``F.fold`` for a k×k), grad_weight = G · Xᵀ sampled on the mask (``torch.sparse.sampled_addmm``).
    """
    layer, layout = case.layer, ops.layout
    taps = layer.kernel**2
    lo, hi = case.stages
    read = layout.in_offsets[hi]
    rows = slice(layout.out_offsets[lo], layout.out_offsets[hi])
    sizes = [*(c * taps for c in layout.in_splits[:hi]), *layout.out_splits[lo:hi]]
    block = math.gcd(*(size for size in sizes if size)) or 1
    matrix = (ops.weight * ops.mask)[rows, :read].reshape(rows.stop - rows.start, read * taps)
    matmul = _sparse_matmul(ops.weight.device, block)
    try:
        sparse_weight = _sparse(matrix, block)
    except RuntimeError as failure:  # a dtype or device without sparse conversions
        return Implementation(BLOCK_SPARSE, "baseline", None, unavailable=f"n/a: {failure}"[:200])
    like = ops.grad_output

    if case.mode != "backward":
        input = ops.input[:, :read]
        return Implementation(BLOCK_SPARSE, "baseline",
                              lambda: _from_columns(layer, matmul(sparse_weight, _columns(layer, input)), like),
                              lambda y: (y,), fallible=True)
    transposed = _sparse(matrix.t().contiguous(), block)
    pattern = (ops.mask.reshape(ops.mask.shape[0], -1) != 0).to(ops.weight.dtype).to_sparse_csr()
    unfolds = not layer.is_linear and (layer.kernel != 1 or layer.stride != 1)

    def grad_input_from(columns: Tensor) -> Tensor:
        if not unfolds:
            return _from_columns(layer, columns, ops.input)
        unfolded = columns.view(columns.shape[0], ops.input.shape[0], -1).transpose(0, 1)
        grad = F.fold(unfolded, (layer.height, layer.width), layer.kernel, padding=layer.padding, stride=layer.stride)
        return grad.contiguous(memory_format=_memory_format(ops.input))

    def run():
        input_columns = _columns(layer, ops.input)
        output = _from_columns(layer, matmul(sparse_weight, input_columns), like)
        gradient = _output_columns(layer, ops.grad_output)
        grad_input = grad_input_from(matmul(transposed, gradient))
        grad_weight = torch.sparse.sampled_addmm(pattern, gradient, input_columns.t(), beta=0.0)
        return output, grad_input, grad_weight

    def result(values):
        _, grad_input, grad_weight = values
        return grad_input, grad_weight.to_dense().view(ops.weight.shape)

    return Implementation(BLOCK_SPARSE, "baseline", run, result, fallible=True)


def _output_columns(layer: LayerShape, grad_output: Tensor) -> Tensor:
    """grad_output (N, D, H_out, W_out) as the (D, N · H_out · W_out) matrix; (D, N) for a linear layer."""
    return grad_output.t() if layer.is_linear else grad_output.transpose(0, 1).reshape(grad_output.shape[1], -1)


def implementations(case: Case, ops: Operands, backends: Sequence[str]) -> list[Implementation]:
    return [*(_ours(case, ops, backend) for backend in backends), *_baselines(case, ops), _block_sparse(case, ops),
            _dense(case, ops), _grouped(case, ops)]


# ----------------------------------------------------------------------------------------------
# Running cases
# ----------------------------------------------------------------------------------------------



def expected_result(case: Case, reference_ops: Operands) -> tuple[Tensor, ...]:
    """What every implementation must compute: the first baseline, on float64 operands."""
    reference = _baselines(case, reference_ops)[0]
    return reference.result(reference.run())


def check_implementation(
    impl: Implementation, expected: tuple[Tensor, ...], dtype: torch.dtype
) -> tuple[str, float | None]:
    """(status, relative error) of one implementation against the float64 baseline.

    A failure of one of ours (a dtype without a kernel, a kernel that does not compile or build
    here) becomes status ``error: ...`` so that a long run goes on and the row says why; the
    baselines and reference points are plain PyTorch, a failure there is a bug and propagates.
    """
    if impl.unavailable:
        return impl.unavailable, None
    if impl.result is None:
        return "ok", None  # a reference point computes something else: nothing to compare
    try:
        error = relative_error(impl.result(impl.run()), expected)
    except Exception as failure:
        if impl.role != "ours" and not impl.fallible:
            raise
        return f"error: {type(failure).__name__}: {failure}".replace("\n", " ")[:300], None
    return ("ok" if error <= CHECK_TOLERANCE[dtype] else "wrong"), error


def run_case(case: Case, ops: Operands, reference_ops: Operands, backends: Sequence[str], device: torch.device,
             config: TimingConfig) -> list[dict]:
    """Check and time every implementation of one case; one row (a dict) per implementation."""
    impls = implementations(case, ops, backends)
    expected = expected_result(case, reference_ops)
    checks = {impl.name: check_implementation(impl, expected, case.dtype) for impl in impls}
    timed = {impl.name: impl.run for impl in impls if checks[impl.name][0] in ("ok", "wrong")}
    timings = measure(timed, device, config)
    dense_ms = timings["dense"].median_ms
    flop_ideal = roofline.flop_ideal_ms(case, dense_ms)
    gpu = roofline.gpu_peaks(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    unit = roofline.math_unit(case.dtype, case.layer.is_linear)
    roofline_ms = roofline.roofline_ms(case, gpu, unit) if gpu and unit else None
    shared = _case_columns(case, _memory_format(ops.input) == torch.channels_last) | {
        "flop_ideal_ms": flop_ideal,
        "roofline_ms": roofline_ms,
        "roofline_bound": roofline.roofline_bound(case, gpu, unit) if roofline_ms is not None else "",
    }
    rows = []
    for impl in impls:
        status, error = checks[impl.name]
        timing = timings.get(impl.name)
        rows.append(shared | {
            "implementation": impl.name,
            "role": impl.role,
            "status": status,
            "max_rel_error": error,
            "median_ms": timing.median_ms if timing else None,
            "q25_ms": timing.q25_ms if timing else None,
            "q75_ms": timing.q75_ms if timing else None,
            "ratio_to_flop_ideal": timing.median_ms / flop_ideal if timing else None,
            "ratio_to_roofline": timing.median_ms / roofline_ms if timing and roofline_ms else None,
            "speedup_vs_dense": dense_ms / timing.median_ms if timing else None,
        })
    return rows


def _case_columns(case: Case, channels_last: bool) -> dict:
    layer, layout = case.layer, case.layout
    return {
        "shape": layer.label,
        "sources": "; ".join(layer.sources),
        "kind": "linear" if layer.is_linear else "conv",
        "batch": case.batch,
        "in_channels": layer.in_channels,
        "out_channels": layer.out_channels,
        "height": layer.height,
        "width": layer.width,
        "kernel": layer.kernel,
        "stride": layer.stride,
        "padding": layer.padding,
        "K": case.num_groups,
        "in_splits": "/".join(map(str, layout.in_splits)),
        "out_splits": "/".join(map(str, layout.out_splits)),
        "dtype": str(case.dtype).removeprefix("torch."),
        "mode": case.mode,
        "stage": case.stage,
        "useful_gflop": roofline.useful_flops(case) / 1e9,
        "dense_gflop": roofline.dense_flops(case) / 1e9,
        "useful_fraction": roofline.useful_fraction(case),
        "min_mbytes": roofline.minimal_bytes(case, channels_last) / 1e6,
    }


def run_cases(cases: Sequence[Case], device: torch.device, config: TimingConfig,
              memory_format: torch.memory_format = torch.contiguous_format, backends: Sequence[str] | None = None,
              progress: Callable[[str], None] | None = print,
              checkpoint: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Run every case; consecutive cases of one (layer, batch, K, dtype) share their tensors.

    ``backends``: which of ours to time (default: every backend available on ``device``).
    ``checkpoint(rows)``: called with every row so far after each such group (a run stopped by a
    time limit keeps what it measured).
    """
    available = available_backends(device)
    backends = available if backends is None else list(backends)
    missing = [name for name in backends if name not in available]
    if missing:
        raise ValueError(f"backends {missing} are not available on {device.type}; available: {available}")
    rows = []
    for _, group in groupby(cases, key=lambda c: (c.layer.geometry_key, c.batch, c.num_groups, c.dtype)):
        group = list(group)
        ops = make_operands(group[0], device, memory_format)
        reference_ops = ops.to(torch.float64)
        for case in group:
            case_rows = run_case(case, ops, reference_ops, backends, device, config)
            rows.extend(case_rows)
            if progress:
                progress(_progress_line(case, case_rows))
        del ops, reference_ops
        if checkpoint:
            checkpoint(rows)
    return rows


def _progress_line(case: Case, case_rows: Sequence[dict]) -> str:
    cells = [f"{r['implementation']} {r['median_ms']:.3f}" for r in case_rows if r["median_ms"] is not None]
    speedup = best_ours_vs_best_baseline(case_rows)
    problems = [f"{r['implementation']}: {r['status']}" for r in case_rows if r["status"] not in ("ok",)
                and not r["status"].startswith("n/a")]
    return (f"{case.layer.label:>24} N={case.batch} K={case.num_groups} {str(case.dtype)[6:]:>8} "
            f"{case.mode_label:<12} ms: {', '.join(cells)}"
            + (f" | best ours/baseline {speedup:.2f}x" if speedup else "")
            + (f" | {'; '.join(problems)}" if problems else ""))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _choice_list(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        unknown = [v for v in values if v not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {list(choices)}, got {text!r}")
        return values

    return parse


def _custom_shape(text: str) -> LayerShape:
    values = _int_list(text)
    if len(values) not in (5, 6) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected C,D,H,W,k or C,D,H,W,k,stride (positive integers), got {text!r}")
    in_channels, out_channels, height, width, kernel, *stride = values
    return LayerShape(in_channels, out_channels, height, width, kernel, stride[0] if stride else 1, kernel // 2,
                      sources=(f"custom --shape {text}",))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdn-bench-kernels",
                                     description="Benchmark the nested conv kernels against their baselines.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="the quick subset of shapes, stages and timing")
    parser.add_argument("--modes", type=_choice_list(MODES), default=MODES, help="comma-separated, default: all")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output directory")
    parser.add_argument("--plan", choices=PLAN_NAMES,
                        help="shape plan (default: cpu / gpu, with -quick under --quick)")
    parser.add_argument("--k", type=_int_list, help="override the plan's group counts, e.g. 4,7")
    parser.add_argument("--batch", type=_int_list, help="override the plan's batch sizes, e.g. 16,32")
    parser.add_argument("--dtypes", type=_choice_list(tuple(_DTYPES)), help="override the plan's dtypes")
    parser.add_argument("--models", help="keep only layers of these models (comma-separated name prefixes, "
                                         "e.g. resnext50,efficientnet_lite0)")
    parser.add_argument("--shape", type=_custom_shape, metavar="C,D,H,W,k[,stride]",
                        help="benchmark this one convolution instead of the plan's layers (C → D channels, "
                             "H×W input, k×k kernel, padding k // 2, stride 1 unless given); K, batch, dtype, "
                             "layout and modes come from the other options")
    parser.add_argument("--stages", choices=("all", "ends"), help="override the plan's stage selection")
    parser.add_argument("--channels-last", action="store_true", help="NHWC inputs (convolutions only)")
    parser.add_argument("--backends", type=_choice_list(KNOWN_BACKENDS),
                        help="which of our backends to time (default: every available one)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for the run (CPU; default: torch's)")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="CPU: wall time, or the thread's CPU time (with --threads 1: steadier on a shared "
                             "machine, the time spent descheduled is not counted)")
    parser.add_argument("--no-cudnn-benchmark", action="store_true",
                        help="GPU: keep cuDNN's heuristic algorithm choice (default: autotune the baselines' convs)")
    parser.add_argument("--timing", choices=tuple(TIMING_PRESETS), help="timing preset (default: full, quick)")
    parser.add_argument("--name", default="nested_conv", help="file-name stem of the outputs")
    return parser


def _select_plan(args: argparse.Namespace) -> Plan:
    chosen = plan(args.plan or ("cpu" if args.device == "cpu" else "gpu") + ("-quick" if args.quick else ""))
    if args.shape:
        if args.models:
            raise SystemExit("--shape and --models both choose the layers: give one")
        chosen = replace(chosen, layers=(args.shape,))
    if args.models:
        prefixes = tuple(p.strip() for p in args.models.split(",") if p.strip())
        layers = tuple(layer for layer in chosen.layers if any(m.startswith(prefixes) for m in layer.models))
        if not layers:
            raise SystemExit(f"--models {args.models!r} matches no layer of the plan")
        chosen = replace(chosen, layers=layers)
    overrides = {"group_counts": args.k, "batches": args.batch, "stages": args.stages,
                 "dtypes": tuple(_DTYPES[d] for d in args.dtypes) if args.dtypes else None}
    return replace(chosen, **{key: value for key, value in overrides.items() if value is not None})


def main(argv: list[str] | None = None) -> dict[str, Path]:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch build sees no CUDA GPU")
    cases = _select_plan(args).cases(args.modes)
    config = replace(TIMING_PRESETS[args.timing or ("quick" if args.quick else "full")], clock=args.clock)
    if args.clock == "thread" and (device.type != "cpu" or args.threads != 1):
        raise SystemExit("--clock thread times one CPU thread: give --device cpu --threads 1")
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    backends = args.backends or available_backends(device)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        # The baselines get cuDNN's autotuned algorithm (the warm-up runs tune it): the strongest baseline.
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    info = machine_info(device)
    info |= {"backends": ", ".join(backends), "memory_format": "channels_last"
             if args.channels_last else "contiguous", "timing": str(config),
             "command": " ".join(["rdn-bench-kernels", *(sys.argv[1:] if argv is None else argv)])}
    print(f"{len(cases)} cases on {info['device']} ({info['cpu']}, {info['torch_threads']} threads)", flush=True)
    stem = f"{args.name}_{device_tag(device)}" + ("_quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / f"{stem}.csv"

    def checkpoint(rows: list[dict]) -> None:
        # The CSV so far, replaced atomically after every group of cases: a run cut short by a time
        # limit (gpu-check's) leaves the rows it measured, which `python -m benchmarks.report` renders.
        write_csv(rows, info, partial.with_suffix(".csv.tmp"))
        partial.with_suffix(".csv.tmp").replace(partial)

    rows = run_cases(cases, device, config, memory_format, backends, progress=lambda line: print(line, flush=True),
                     checkpoint=checkpoint)
    paths = write_reports(rows, info, args.out, stem)
    for path in paths.values():
        print(f"wrote {path}")
    return paths


def console_main() -> int:
    """The ``rdn-bench-kernels`` command (pyproject's console script): :func:`main`, exit status 0."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(console_main())
