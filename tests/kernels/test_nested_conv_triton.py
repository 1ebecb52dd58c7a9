"""The Triton backend of nested_conv2d, run by Triton's interpreter on CPU tensors.

The interpreter is chosen when the kernels are decorated (``triton.jit`` reads TRITON_INTERPRET
then), and flipping the variable inside a shared pytest process would also change
``available_backends`` for every other test module. So the kernel tests below run only in a
process started with TRITON_INTERPRET=1: in a plain ``pytest`` run they are skipped and
:func:`test_interpreter_suite` starts that process on this file and on the backend-generic
files that list ``triton`` among their backends (one subprocess, its failures reported in the
assertion). ``TRITON_INTERPRET=1 pytest tests/kernels/test_nested_conv_triton.py``
runs them directly.

Under the interpreter the kernels use ``INTERPRETER_CONFIG``'s small tiles, so these tiny shapes
still cross tile, run and channel-chunk boundaries. Every result is compared with the float64
reference (:mod:`rdn_kernels.nested_conv.naive`) on the same inputs.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from rdn_kernels.layout import make_layout
from rdn_kernels.nested_conv import naive, nested_conv2d
from rdn_kernels.nested_conv.geometry import ConvGeometry
from tests.utils import assert_close, nan_filled_like

pytest.importorskip("triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter_only = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess started by test_interpreter_suite"
)
REPO_ROOT = Path(__file__).resolve().parents[2]
# This file, and the backend-generic files whose triton cases need the interpreter.
INTERPRETER_FILES = [
    str(Path(__file__).with_name(name))
    for name in ("test_nested_conv_triton.py", "test_out_contract.py", "test_uninitialized_fill.py",
                 "test_operand_strides.py")
]


@pytest.mark.skipif(INTERPRETED, reason="this process is the interpreter run")
def test_interpreter_suite():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", *INTERPRETER_FILES, "-q", "-x", "-p", "no:cacheprovider"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = f"{completed.stdout[-6000:]}\n{completed.stderr[-3000:]}"
    assert completed.returncode == 0, f"interpreter tests failed:\n{report}"
    assert " passed" in completed.stdout, report


@pytest.mark.skipif(INTERPRETED, reason="checks the plain (compiled-Triton) process")
def test_cpu_tensors_need_the_interpreter():
    import rdn_kernels
    from rdn_kernels.backends import BackendUnavailableError

    assert "triton" not in rdn_kernels.available_backends("cpu")
    x, weight = torch.randn(1, 2, 3, 3), torch.randn(2, 2, 1, 1)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        nested_conv2d(x, weight, in_splits=(1, 1), out_splits=(1, 1), backend="triton")


def _backend():
    from rdn_kernels.nested_conv import triton as triton_backend

    return triton_backend


# ----------------------------------------------------------------------------------------------
# Problems: tiny, odd, covering K in {1, 2, 3, 4}, empty groups, sparse masks and the geometry
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    in_splits: tuple[int, ...]
    out_splits: tuple[int, ...]
    mask: tuple[tuple[int, ...], ...] | None
    kernel: int
    stride: int | tuple[int, int]
    padding: int | tuple[int, int]
    dilation: int | tuple[int, int]
    batch: int
    size: tuple[int, int]
    stages: tuple[int, int]  # the stage the backward and out= tests run

    def __str__(self) -> str:
        return self.name


# Output group 1 of the sparse case reads nothing (bias only), group 3 skips input group 2.
_SPARSE = ((1, 0, 0, 0), (0, 0, 0, 0), (1, 0, 1, 0), (0, 1, 0, 1))
CASES = [
    Case("k1_pointwise", (7,), (13,), None, 1, 1, 0, 1, 2, (5, 4), (0, 1)),
    Case("k2_empty_input_group_strided", (0, 7), (5, 8), None, 3, 2, 1, 1, 1, (7, 6), (0, 2)),
    Case("k3_empty_output_group", (3, 4, 6), (5, 0, 8), None, 3, 1, 1, 1, 2, (5, 5), (1, 3)),
    Case("k4_sparse_dilated", (2, 3, 0, 8), (4, 3, 5, 4), _SPARSE, 3, (1, 2), (2, 1), 2, 1, (6, 7), (1, 4)),
    Case("k4_1x1_strided_padded", (1, 2, 3, 1), (2, 2, 1, 2), None, 1, 2, 1, 1, 2, (5, 5), (2, 4)),
    # Channel offsets all multiples of 8: the kernels get CHANNEL_ALIGN = 8 (vectorised on a GPU).
    Case("k2_aligned_pointwise", (8, 16), (16, 8), None, 1, 1, 0, 1, 1, (3, 3), (1, 2)),
]


def _problem(case: Case, dtype: torch.dtype, channels_last: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    layout = make_layout(case.in_splits, case.out_splits, case.mask)
    geometry = ConvGeometry.from_args(case.stride, case.padding, case.dilation)
    channels, out_channels = sum(case.in_splits), sum(case.out_splits)
    x = torch.randn(case.batch, channels, *case.size, generator=generator, dtype=torch.float64)
    # Weights scaled like a default init so fp16 sums stay O(1).
    weight = torch.randn(out_channels, channels, case.kernel, case.kernel, generator=generator, dtype=torch.float64)
    weight /= math.sqrt(max(1, channels * case.kernel**2))
    bias = torch.randn(out_channels, generator=generator, dtype=torch.float64)
    x, weight, bias = (t.to(dtype) for t in (x, weight, bias))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        weight = weight.contiguous(memory_format=torch.channels_last)
    return layout, geometry, x, weight, bias


def _reference_forward(x, weight, bias, layout, geometry, lo, hi):
    up = (t.double() if t is not None else None for t in (x, weight, bias))
    return naive.nested_conv2d_reference(*up, layout, geometry, lo, hi)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@interpreter_only
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_fp32(case, channels_last):
    layout, geometry, x, weight, bias = _problem(case, torch.float32, channels_last)
    num_groups = layout.num_groups
    result = _backend().forward(x, weight, bias, layout, geometry, 0, num_groups, None)
    expected = _reference_forward(x, weight, bias, layout, geometry, 0, num_groups)
    assert result.shape == expected.shape
    assert result.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close(result, expected, torch.float32, "output")


@interpreter_only
@pytest.mark.parametrize(
    "dtype",
    [
        torch.float64,
        torch.float16,
        pytest.param(
            torch.bfloat16,
            marks=pytest.mark.xfail(
                strict=True,
                raises=AssertionError,
                reason="Triton 3.9's interpreter multiplies bf16 operands of tl.dot as their uint16 bit "
                "patterns; bf16 is covered by the static compile check and needs a GPU run",
            ),
        ),
    ],
    ids=str,
)
@pytest.mark.parametrize("case", [CASES[2], CASES[3]], ids=str)
def test_forward_dtypes(case, dtype):
    layout, geometry, x, weight, bias = _problem(case, dtype, channels_last=True)
    result = _backend().forward(x, weight, bias, layout, geometry, 0, layout.num_groups, None)
    assert result.dtype == dtype
    assert_close(result, _reference_forward(x, weight, bias, layout, geometry, 0, layout.num_groups), dtype, "output")


@interpreter_only
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES[1:4], ids=str)
def test_stage_into_out_leaves_other_channels(case, channels_last):
    layout, geometry, x, weight, bias = _problem(case, torch.float64, channels_last)
    lo, hi = case.stages
    full = _reference_forward(x, weight, bias, layout, geometry, 0, layout.num_groups)
    out = torch.randn(full.shape, dtype=torch.float64)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    before = out.clone()
    start, stop = layout.out_offsets[lo], layout.out_offsets[hi]
    returned = _backend().forward(x, weight, bias, layout, geometry, lo, hi, out)
    assert returned is out
    assert_close(out[:, start:stop], full[:, start:stop], torch.float64, "stage slice of out")
    assert torch.equal(out[:, :start], before[:, :start]) and torch.equal(out[:, stop:], before[:, stop:])


@interpreter_only
def test_stage_reads_only_input_prefix():
    """Stage (0, 2) of K=3 takes an input holding only the channels of groups < 2."""
    layout, geometry, x, weight, bias = _problem(CASES[2], torch.float64, channels_last=False)
    prefix = x[:, : layout.in_offsets[2]]
    out = nan_filled_like(_reference_forward(x, weight, bias, layout, geometry, 0, 3))
    _backend().forward(prefix, weight, bias, layout, geometry, 0, 2, out)
    expected = _reference_forward(x, weight, bias, layout, geometry, 0, 2)
    assert_close(out[:, : layout.out_offsets[2]], expected, torch.float64, "stage (0, 2)")
    assert out[:, layout.out_offsets[2] :].isnan().all()


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


def _check_backward(case: Case, dtype: torch.dtype, channels_last: bool) -> None:
    layout, geometry, x, weight, _ = _problem(case, dtype, channels_last, seed=1)
    lo, hi = case.stages
    out_shape = _reference_forward(x, weight, None, layout, geometry, lo, hi).shape
    grad_output = torch.randn(out_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    if channels_last:
        grad_output = grad_output.contiguous(memory_format=torch.channels_last)
    grad_input, grad_weight, grad_bias = _backend().backward(
        grad_output, x, weight, True, layout, geometry, lo, hi, True, True
    )
    expected = naive.nested_conv2d_reference_backward(
        grad_output.double(), x.double(), weight.double(), True, layout, geometry, lo, hi
    )
    actual_grads = (grad_input, grad_weight, grad_bias)
    for name, actual, reference in zip(("input", "weight", "bias"), actual_grads, expected, strict=True):
        assert actual.shape == reference.shape, name
        assert_close(actual, reference, dtype, f"grad_{name}")
    # Blocks outside the mask or the stage, and input channels the stage does not read: exactly zero.
    weight_support = torch.zeros(weight.shape[:2], dtype=torch.bool)
    for j in range(lo, hi):
        for start, stop in layout.input_runs(j):
            weight_support[layout.out_offsets[j] : layout.out_offsets[j + 1], start:stop] = True
    assert (grad_weight[~weight_support] == 0).all()
    read_channels = weight_support.any(dim=0)
    assert (grad_input[:, ~read_channels] == 0).all()


@interpreter_only
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_fp64(case):
    # Both layouts across the cases: the batch-1 cases run channels_last.
    _check_backward(case, torch.float64, channels_last=case.batch == 1)


@interpreter_only
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_backward_fp32(channels_last):
    _check_backward(CASES[3], torch.float32, channels_last)


@interpreter_only
def test_backward_asks_only_for_what_is_needed():
    layout, geometry, x, weight, _ = _problem(CASES[0], torch.float64, channels_last=False)
    grad_output = torch.ones(_reference_forward(x, weight, None, layout, geometry, 0, 1).shape, dtype=torch.float64)
    grads = _backend().backward(grad_output, x, weight, False, layout, geometry, 0, 1, False, True)
    assert grads[0] is None and grads[1] is not None and grads[2] is None


@interpreter_only
def test_grad_weight_pixel_splits_sum_to_one_pass():
    """Split reduction (used on GPUs to fill the SMs) gives the same gradient, zeros kept zero."""
    case = CASES[4]
    layout, geometry, x, weight, _ = _problem(case, torch.float64, channels_last=True)
    lo, hi = case.stages
    grad_output = torch.randn(_reference_forward(x, weight, None, layout, geometry, lo, hi).shape, dtype=torch.float64)
    one_pass = _backend().grad_weight(grad_output, x, weight, layout, geometry, lo, hi, num_splits=1)
    for num_splits in (3, 13):  # 13 leaves the last splits short or empty
        split = _backend().grad_weight(grad_output, x, weight, layout, geometry, lo, hi, num_splits=num_splits)
        assert_close(split, one_pass, torch.float64, f"grad_weight with {num_splits} pixel splits")
        assert torch.equal(split == 0, one_pass == 0)


# ----------------------------------------------------------------------------------------------
# Through the public op (torch.library custom ops + autograd) with backend="triton"
# ----------------------------------------------------------------------------------------------


@interpreter_only
def test_public_op_forward_backward_and_out():
    import rdn_kernels

    assert "triton" in rdn_kernels.available_backends("cpu")
    case = CASES[4]
    layout, geometry, x, weight, bias = _problem(case, torch.float64, channels_last=False)
    kwargs = dict(in_splits=case.in_splits, out_splits=case.out_splits, stride=case.stride, padding=case.padding)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    result = nested_conv2d(*leaves, **kwargs, backend="triton")
    (result * torch.arange(result.numel(), dtype=result.dtype).view_as(result).sin()).sum().backward()
    reference_leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    reference = nested_conv2d(*reference_leaves, **kwargs, backend="torch")
    (reference * torch.arange(reference.numel(), dtype=reference.dtype).view_as(reference).sin()).sum().backward()
    assert_close(result, reference, torch.float64, "output")
    for name, leaf, reference_leaf in zip(("input", "weight", "bias"), leaves, reference_leaves, strict=True):
        assert_close(leaf.grad, reference_leaf.grad, torch.float64, f"grad_{name}")

    out = nan_filled_like(reference.detach())
    nested_conv2d(x, weight, bias, **kwargs, stages=(0, 1), out=out, backend="triton")
    nested_conv2d(x, weight, bias, **kwargs, stages=(1, 4), out=out, backend="triton")
    assert_close(out, reference.detach(), torch.float64, "output assembled from two stages")


@interpreter_only
def test_gradcheck_fp64_through_the_op():
    generator = torch.Generator().manual_seed(3)
    leaves = [
        torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_()
        for shape in ((1, 3, 4, 4), (3, 3, 3, 3), (3,))
    ]

    def conv(x, weight, bias):
        return nested_conv2d(
            x, weight, bias, in_splits=(1, 2), out_splits=(2, 1), stride=2, padding=1, backend="triton"
        )

    assert torch.autograd.gradcheck(conv, leaves, fast_mode=True)


# ----------------------------------------------------------------------------------------------
# Launcher helpers
# ----------------------------------------------------------------------------------------------


@interpreter_only
def test_channel_alignment_hint_divides_every_offset():
    backend = _backend()
    assert backend._channel_alignment(make_layout((8, 16), (16, 8))) == 8
    assert backend._channel_alignment(make_layout((32, 64), (16, 48))) == 16
    assert backend._channel_alignment(make_layout((3, 4, 6), (5, 0, 8))) == 1


@interpreter_only
def test_tensors_beyond_int32_addressing_are_refused():
    huge = torch.empty((1, 2, 1 << 16, 1 << 15), device="meta")  # 2**32 elements per sample, no memory
    with pytest.raises(ValueError, match="int32"):
        _backend()._check_int32_extent("input", huge)


def test_launch_limits_are_refused_with_a_clear_error():
    """The kernels' int32 pixel indices step up to a tile (and grad-weight's last split up to 63
    pixels) past the last pixel, so the pixel count keeps that margin below 2**31 (a split end of
    2**31 wrapped and silently dropped a split from grad_weight); grad-input's stride phases and
    grad-weight's taps go on a grid axis that CUDA caps at 65535."""
    backend = _backend()
    weight = torch.empty((2, 2, 1, 1), device="meta")
    backend._check_extents(2**31 - 1025, {}, weight)
    for pixels in (2**31 - 1024, 2**31 - 2, 2**31):
        with pytest.raises(ValueError, match="int32 pixel indices"):
            backend._check_extents(pixels, {}, weight)
    backend._check_grid_axis("kernel_h · kernel_w", 65535)
    with pytest.raises(ValueError, match=r"stride_h · stride_w = 65536 exceeds CUDA's 65535"):
        backend._check_grid_axis("stride_h · stride_w", 256 * 256)


@pytest.mark.skipif(INTERPRETED, reason="inspects the compiled-Triton autotuners")
def test_autotuners_key_on_pixel_buckets_not_exact_counts():
    """The early-exit engine's shrinking batches must not re-tune the kernels at every batch size."""
    backend = _backend()
    assert [backend.pixel_bucket(n) for n in (0, 1, 2, 3, 784, 1024, 1025)] == [1, 1, 2, 4, 1024, 1024, 2048]
    for autotuner in (backend._forward, backend._grad_input):
        assert "pixel_bucket" in autotuner.keys
        assert not {"num_pixels", "num_phase_pixels"} & set(autotuner.keys)
