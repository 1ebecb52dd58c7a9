"""nested_conv2d / nested_linear on the CPU backends (torch reference, cpp) against the references.

Chain of trust: the reference (one F.conv2d per block) is checked against a masked dense
F.conv2d; every backend is checked against the reference evaluated in float64.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import rdn_kernels
from rdn_kernels import make_layout, nested_conv2d, nested_linear
from rdn_kernels.backends import KNOWN_BACKENDS
from tests.kernels.availability import require_backend
from tests.utils import assert_close, nan_filled_like

BACKENDS = ["torch", "cpp"]
DTYPES = [torch.float32, torch.float64]


@dataclasses.dataclass(frozen=True)
class Case:
    in_splits: tuple[int, ...]
    out_splits: tuple[int, ...]
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    batch: int = 2
    size: tuple[int, int] = (5, 6)
    block_mask: tuple | None = None

    def __str__(self) -> str:
        mask = "sparse" if self.block_mask else "full"
        return (
            f"in{list(self.in_splits)}-out{list(self.out_splits)}-k{self.kernel}s{self.stride}p{self.padding}"
            f"d{self.dilation}-n{self.batch}-{self.size[0]}x{self.size[1]}-{mask}"
        )

    @property
    def layout(self):
        return make_layout(self.in_splits, self.out_splits, self.conv_kwargs["block_mask"])

    @property
    def conv_kwargs(self) -> dict:
        return dict(
            in_splits=self.in_splits,
            out_splits=self.out_splits,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            block_mask=None if self.block_mask is None else [list(row) for row in self.block_mask],
        )

    def tensors(self, dtype: torch.dtype, channels_last: bool, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        channels, out_channels = sum(self.in_splits), sum(self.out_splits)
        input = torch.randn(self.batch, channels, *self.size, generator=generator, dtype=dtype)
        weight = torch.randn(out_channels, channels, self.kernel, self.kernel, generator=generator, dtype=dtype)
        bias = torch.randn(out_channels, generator=generator, dtype=dtype)
        if channels_last:
            input = input.to(memory_format=torch.channels_last)
        return input, weight, bias


SPARSE_4 = ((1, 0, 0, 0), (0, 1, 0, 0), (1, 0, 1, 0), (0, 1, 1, 1))
SPARSE_4_EMPTY_ROW = ((1, 0, 0, 0), (0, 0, 0, 0), (1, 0, 1, 0), (0, 1, 1, 1))  # output group 1 reads nothing
CASES = [
    Case((7,), (5,)),  # K = 1: a plain conv
    Case((3, 4), (2, 6)),
    Case((4, 4, 4, 4), (6, 6, 6, 6)),
    Case((2, 3, 1, 4), (3, 1, 4, 2), block_mask=SPARSE_4),
    Case((3, 0, 4), (2, 3, 0)),  # zero-size groups on both sides
    Case((1, 2, 1, 2, 1, 2, 4), (2, 1, 2, 1, 2, 1, 3)),  # K = 7, unequal
    Case((5, 5, 3), (4, 4, 4), batch=1, size=(1, 1)),
    Case((4, 4, 4, 4), (6, 6, 6, 6), kernel=3, padding=1),
    Case((3, 4), (5, 2), kernel=3, stride=2, padding=1, size=(7, 9)),
    Case((2, 3, 2), (3, 3, 3), kernel=3, dilation=2, padding=2, size=(6, 7)),
    Case((3, 4), (4, 3), kernel=5, padding=2, batch=1, size=(5, 5)),
    Case((4, 4, 4, 4), (6, 6, 6, 6), kernel=1, stride=2, size=(7, 7)),
    Case((2, 3, 1, 4), (3, 1, 4, 2), kernel=3, padding=1, block_mask=SPARSE_4),
    # Many pixel tiles, tiles that straddle samples and rows, padding wider than the kernel's reach.
    Case((5, 6, 4), (7, 3, 6), kernel=3, stride=2, padding=1, batch=3, size=(13, 11)),
    Case((3, 4), (4, 5), kernel=3, padding=3, dilation=1, batch=2, size=(4, 5)),
    Case((6, 6, 5), (9, 8, 7), batch=3, size=(9, 13)),
    # k×k groups of 32 channels: the cpp backend's one-convolution-per-group path (dense rows, masked
    # rows, a group that reads nothing, an empty group).
    Case((32, 32, 32, 32), (32, 32, 32, 32), kernel=3, padding=1, batch=1, size=(3, 4)),
    Case((32, 32, 32, 32), (32, 32, 32, 32), kernel=3, padding=1, batch=1, size=(3, 4), block_mask=SPARSE_4_EMPTY_ROW),
    Case((32, 32, 32, 32), (32, 0, 32, 32), kernel=3, padding=1, batch=1, size=(3, 4)),
]


def masked_dense(input, weight, bias, case: Case):
    """One F.conv2d with the weight multiplied by the block mask: the other independent oracle."""
    layout = case.layout
    mask = _read_blocks(layout, 0, layout.num_groups, weight.shape[:2]).to(device=weight.device, dtype=weight.dtype)
    return F.conv2d(input, weight * mask[:, :, None, None], bias, case.stride, case.padding, case.dilation)


def stage_ranges(num_groups: int) -> list[tuple[int, int] | None]:
    ranges: list[tuple[int, int] | None] = [None, (0, 1), (num_groups - 1, num_groups)]
    if num_groups > 2:
        ranges += [(1, num_groups - 1), (0, num_groups // 2)]
    return ranges


def reference64(input, weight, bias, case: Case, stages):
    return nested_conv2d(
        input.double(), weight.double(), bias.double(), **case.conv_kwargs, stages=stages, backend="torch"
    )


def over_backends_cases_formats(test):
    """Parametrise a test over every CPU backend, every case and both memory formats."""
    test = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])(test)
    test = pytest.mark.parametrize("case", CASES, ids=str)(test)
    return pytest.mark.parametrize("backend", BACKENDS)(test)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_equals_masked_dense(case: Case):
    input, weight, bias = case.tensors(torch.float64, channels_last=False)
    expected = masked_dense(input, weight, bias, case)
    assert_close(nested_conv2d(input, weight, bias, **case.conv_kwargs, backend="torch"), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@over_backends_cases_formats
def test_forward_matches_reference(backend, case, dtype, channels_last):
    require_backend(backend)
    input, weight, bias = case.tensors(dtype, channels_last)
    layout = case.layout
    for stages in stage_ranges(layout.num_groups):
        actual = nested_conv2d(input, weight, bias, **case.conv_kwargs, stages=stages, backend=backend)
        expected = reference64(input, weight, bias, case, stages)
        assert_close(actual, expected, dtype, what=f"stages={stages}")
        assert actual.dtype == dtype
        if channels_last and min(actual.shape[1:]) > 1:
            assert actual.is_contiguous(memory_format=torch.channels_last), "output should follow the input layout"


@over_backends_cases_formats
def test_stages_write_into_out_slice(backend, case, channels_last):
    require_backend(backend)
    input, weight, bias = case.tensors(torch.float32, channels_last)
    layout = case.layout
    full = reference64(input, weight, bias, case, None)
    out = nan_filled_like(full.float())
    if channels_last:
        out = out.to(memory_format=torch.channels_last)
    # Fill the buffer one stage at a time, as dynamic inference does; each call leaves the rest alone.
    for stage in range(layout.num_groups):
        before = out.clone()
        result = nested_conv2d(
            input, weight, bias, **case.conv_kwargs, stages=(stage, stage + 1), out=out, backend=backend
        )
        assert result is out
        start, stop = layout.out_offsets[stage], layout.out_offsets[stage + 1]
        torch.testing.assert_close(out[:, :start], before[:, :start], equal_nan=True, atol=0, rtol=0)
        torch.testing.assert_close(out[:, stop:], before[:, stop:], equal_nan=True, atol=0, rtol=0)
    assert_close(out, full, torch.float32)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_streamed_stores_match_reference(case, channels_last, monkeypatch):
    """The cpp kernels' non-temporal stores (meant for outputs of 16 MB and more) forced on every
    output they may stream: forward and stages into a NaN-filled out=, and the backward."""
    require_backend("cpp")
    monkeypatch.setenv("RDN_KERNELS_CPU_STREAM_MIN_BYTES", "0")
    input, weight, bias = case.tensors(torch.float32, channels_last)
    layout = case.layout
    for stages in stage_ranges(layout.num_groups):
        actual = nested_conv2d(input, weight, bias, **case.conv_kwargs, stages=stages, backend="cpp")
        assert_close(actual, reference64(input, weight, bias, case, stages), torch.float32, what=f"stages={stages}")
    full = reference64(input, weight, bias, case, None)
    out = nan_filled_like(full.float())
    if channels_last:
        out = out.to(memory_format=torch.channels_last)
    for stage in range(layout.num_groups):
        nested_conv2d(input, weight, bias, **case.conv_kwargs, stages=(stage, stage + 1), out=out, backend="cpp")
    assert_close(out, full, torch.float32)
    leaves = [t.detach().clone().requires_grad_(True) for t in (input, weight, bias)]
    grad_output = torch.randn(full.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(nested_conv2d(*leaves, **case.conv_kwargs, backend="cpp"), leaves, grad_output)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (input, weight, bias)]
    expected = torch.autograd.grad(nested_conv2d(*leaves64, **case.conv_kwargs, backend="torch"), leaves64,
                                   grad_output.double())
    for name, grad, want in zip(("input", "weight", "bias"), grads, expected, strict=True):
        assert_close(grad, want, torch.float32, what=f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@over_backends_cases_formats
def test_backward_matches_reference(backend, case, dtype, channels_last):
    require_backend(backend)
    input, weight, bias = case.tensors(dtype, channels_last)
    layout = case.layout
    for stages in stage_ranges(layout.num_groups):
        leaves = [t.detach().clone().requires_grad_(True) for t in (input, weight, bias)]
        output = nested_conv2d(*leaves, **case.conv_kwargs, stages=stages, backend=backend)
        grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
        grads = torch.autograd.grad(output, leaves, grad_output)

        leaves64 = [t.detach().double().requires_grad_(True) for t in (input, weight, bias)]
        expected_output = nested_conv2d(*leaves64, **case.conv_kwargs, stages=stages, backend="torch")
        expected = torch.autograd.grad(expected_output, leaves64, grad_output.double())
        for name, grad, want in zip(("input", "weight", "bias"), grads, expected, strict=True):
            assert_close(grad, want, dtype, what=f"grad {name}, stages={stages}")
        # Blocks outside the mask (and rows outside the stages) get exactly zero gradient.
        lo, hi = stages or (0, layout.num_groups)
        untouched = ~_read_blocks(layout, lo, hi, weight.shape)
        assert torch.all(grads[1][untouched] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [CASES[7], CASES[12]], ids=str)
def test_weights_outside_the_blocks_are_never_read(backend, case):
    """Inf and NaN in the weight entries no block covers change nothing, forward or backward: a
    kernel that multiplies the weight by its mask instead of selecting would spread them."""
    require_backend(backend)
    input, weight, bias = case.tensors(torch.float32, False)
    outside = ~_read_blocks(case.layout, 0, case.layout.num_groups, weight.shape)
    poisoned = weight.clone()
    poisoned[outside] = torch.tensor([float("inf"), float("nan")]).repeat(int(outside.sum()))[: int(outside.sum())]
    results = []
    for w in (weight, poisoned):
        leaves = [t.detach().clone().requires_grad_(True) for t in (input, w, bias)]
        output = nested_conv2d(*leaves, **case.conv_kwargs, backend=backend)
        grads = torch.autograd.grad(output, leaves, torch.ones_like(output))
        results.append((output, grads[0], grads[1][~outside], grads[1][outside]))
    for clean, dirty in zip(*results, strict=True):
        torch.testing.assert_close(dirty, clean, rtol=0, atol=0)


def _read_blocks(layout, lo: int, hi: int, weight_shape) -> torch.Tensor:
    """Bool mask over the weight: True on the blocks that output groups lo..hi-1 read."""
    read = torch.zeros(weight_shape, dtype=torch.bool)
    for j in range(lo, hi):
        rows = slice(layout.out_offsets[j], layout.out_offsets[j + 1])
        for i in range(j + 1):
            if layout.mask[j][i]:
                read[rows, layout.in_offsets[i] : layout.in_offsets[i + 1]] = True
    return read


GRADCHECK_CASES = [CASES[2], CASES[3], CASES[4], CASES[8], CASES[9]]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend, case, channels_last):
    require_backend(backend)
    input, weight, bias = case.tensors(torch.float64, channels_last)
    num_groups = len(case.in_splits)
    for stages in (None, (1, num_groups) if num_groups > 1 else None):
        leaves = [t.detach().clone().requires_grad_(True) for t in (input, weight, bias)]
        assert torch.autograd.gradcheck(
            lambda x, w, b, stages=stages: nested_conv2d(x, w, b, **case.conv_kwargs, stages=stages, backend=backend),
            leaves,
            fast_mode=True,
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_linear(backend):
    require_backend(backend)
    generator = torch.Generator().manual_seed(0)
    in_splits, out_splits = (3, 0, 5, 2), (4, 3, 3, 0)
    input = torch.randn(6, 10, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(10, 10, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(10, generator=generator, dtype=torch.float64, requires_grad=True)
    case = Case(in_splits, out_splits)
    expected = masked_dense(input[:, :, None, None], weight[:, :, None, None], bias, case)[:, :, 0, 0]
    output = nested_linear(input, weight, bias, in_splits=in_splits, out_splits=out_splits, backend=backend)
    assert_close(output, expected)
    splits = dict(in_splits=in_splits, out_splits=out_splits)
    assert torch.autograd.gradcheck(
        lambda x, w, b: nested_linear(x, w, b, **splits, stages=(1, 3), backend=backend), (input, weight, bias)
    )
    out = torch.zeros(6, 10, dtype=torch.float64)
    with torch.no_grad():
        nested_linear(input, weight, bias, **splits, stages=(1, 3), out=out, backend=backend)
    assert_close(out[:, 4:10], expected[:, 4:10])
    assert torch.all(out[:, :4] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_never_reads_later_groups(backend):
    """The first s output groups from the full input equal stages=(0, s) from only the first s input groups."""
    require_backend(backend)
    case = Case((4, 4, 4, 4), (6, 6, 6, 6), kernel=3, padding=1)
    layout = make_layout(case.in_splits, case.out_splits)
    input, weight, bias = case.tensors(torch.float32, channels_last=False)
    full = nested_conv2d(input, weight, bias, **case.conv_kwargs, backend=backend)
    for s in range(1, layout.num_groups + 1):
        prefix_input = input[:, : layout.in_offsets[s]].contiguous()
        prefix = nested_conv2d(prefix_input, weight, bias, **case.conv_kwargs, stages=(0, s), backend=backend)
        torch.testing.assert_close(prefix, full[:, : layout.out_offsets[s]], atol=1e-5, rtol=1e-5)
        # Garbage (even NaN) in the later input groups and in the later weight blocks changes nothing.
        poisoned_input, poisoned_weight = input.clone(), weight.clone()
        poisoned_input[:, layout.in_offsets[s] :] = float("nan")
        poisoned_weight[: layout.out_offsets[s], layout.in_offsets[s] :] = float("nan")
        poisoned = nested_conv2d(
            poisoned_input, poisoned_weight, bias, **case.conv_kwargs, stages=(0, s), backend=backend
        )
        torch.testing.assert_close(poisoned, prefix, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_with_autograd(backend):
    """out= under autograd records the write, so gradients flow through the written slice."""
    require_backend(backend)
    case = CASES[2]
    input, weight, bias = (t.requires_grad_(True) for t in case.tensors(torch.float64, channels_last=False))
    out = torch.zeros(2, 24, 5, 6, dtype=torch.float64)
    result = nested_conv2d(input, weight, bias, **case.conv_kwargs, stages=(1, 3), out=out, backend=backend)
    result.sum().backward()
    direct = [t.detach().clone().requires_grad_(True) for t in (input, weight, bias)]
    nested_conv2d(*direct, **case.conv_kwargs, stages=(1, 3), backend=backend).sum().backward()
    for leaf, twin in zip((input, weight, bias), direct, strict=True):
        assert_close(leaf.grad, twin.grad)


def test_auto_backend_prefers_cpp_for_float32():
    expected = "cpp" if "cpp" in rdn_kernels.available_backends("cpu") else "torch"
    assert rdn_kernels.backends.resolve_backend("auto", torch.device("cpu"), torch.float32) == expected
    assert rdn_kernels.backends.resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "torch"


def test_the_tf32_question_survives_mixed_precision_settings():
    """The GPU backends follow cuDNN's convolution precision. Once the per-operator setting
    (torch >= 2.9) disagrees with the legacy flag, reading the legacy flag raises; the answer comes
    from the convolution's own setting (the flags are process state: restored after)."""
    from rdn_kernels.backends import cudnn_conv_allows_tf32

    cudnn = torch.backends.cudnn
    if not hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        pytest.skip("this torch has no per-operator precision settings")
    saved = cudnn.conv.fp32_precision
    try:
        cudnn.conv.fp32_precision = "ieee"  # torch 2.13's legacy `cudnn.allow_tf32` read raises now
        assert cudnn_conv_allows_tf32() is False
        cudnn.conv.fp32_precision = "tf32"
        assert cudnn_conv_allows_tf32() is True
        with cudnn.flags(enabled=True, allow_tf32=False):  # the legacy API, as the CUDA tests pin it
            assert cudnn_conv_allows_tf32() is False
    finally:
        cudnn.conv.fp32_precision = saved


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument.
# ----------------------------------------------------------------------------------------------

GOOD = dict(in_splits=(2, 2), out_splits=(3, 3))


def _call(**overrides):
    arguments = dict(input=torch.randn(1, 4, 5, 5), weight=torch.randn(6, 4, 3, 3), bias=None, **GOOD)
    arguments.update(overrides)
    input, weight, bias = arguments.pop("input"), arguments.pop("weight"), arguments.pop("bias")
    return nested_conv2d(input, weight, bias, **arguments)


@pytest.mark.parametrize(
    "overrides, error, pattern",
    [
        (dict(in_splits=(2, 1)), ValueError, "in_splits"),
        (dict(out_splits=(3, 2)), ValueError, "out_splits"),
        (dict(in_splits=(2, 2, 0)), ValueError, "same number of groups"),
        (dict(in_splits=(2, -2, 2)), ValueError, "non-negative"),
        (dict(in_splits=(2.0, 2)), TypeError, "in_splits"),
        (dict(in_splits=()), ValueError, "at least one group"),
        (dict(block_mask=[[1, 1], [1, 1]]), ValueError, "lower-triangular"),
        (dict(block_mask=torch.ones(3, 3, dtype=torch.bool).tril()), ValueError, "block_mask must have shape"),
        (dict(block_mask=[[1], [1, 1]]), ValueError, "block_mask"),
        (dict(block_mask=torch.ones(2, 2).tril()), TypeError, "bool"),
        (dict(stages=(0, 3)), ValueError, "stages"),
        (dict(stages=(1, 1)), ValueError, "stages"),
        (dict(stages=(1,)), TypeError, "stages"),
        (dict(out=torch.empty(1, 5, 3, 3)), ValueError, "out must have the full output shape"),
        (dict(out=torch.empty(1, 6, 3, 3, dtype=torch.float64)), TypeError, "out must match"),
        (dict(weight=torch.randn(6, 4, 3, 3, dtype=torch.float64)), TypeError, "weight dtype"),
        (dict(weight=torch.randn(6, 2, 3, 3)), ValueError, "groups=1"),
        (dict(input=torch.randn(4, 5, 5)), ValueError, "input must be 4-D"),
        (dict(input=torch.randn(1, 3, 5, 5)), ValueError, "input has 3 channels"),
        (dict(input=torch.randn(1, 4, 5, 5).long()), TypeError, "floating"),
        (dict(input=[1.0]), TypeError, "input must be a torch.Tensor"),
        (dict(bias=torch.randn(5)), ValueError, "bias"),
        (dict(stride=0), ValueError, "stride"),
        (dict(padding=-1), ValueError, "padding"),
        (dict(padding="same"), ValueError, "padding"),
        (dict(dilation=(1, 2, 3)), TypeError, "dilation"),
        (dict(input=torch.randn(1, 4, 2, 2)), ValueError, "too small"),
        (dict(backend="cudnn"), ValueError, "backend must be"),
        (dict(backend="cuda"), rdn_kernels.BackendUnavailableError, "available"),
    ],
)
def test_bad_input_raises_clear_error(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        _call(**overrides)


def test_layout_and_stage_caches_never_skip_a_check():
    """make_layout remembers the tuples a module passes on every call: equal-valued splits of other
    types (2.0, True) must still be refused after a valid call, and the remembered layout must be
    the one those objects describe."""
    splits, mask = (2, 2), ((True, False), (True, True))
    layout = make_layout(splits, splits, mask)
    assert make_layout(splits, splits, mask) is layout
    assert make_layout([2, 2], [2, 2], [[True, False], [True, True]]) == layout
    for bad in ((2.0, 2), (True, 2)):
        with pytest.raises(TypeError, match="in_splits"):
            make_layout(bad, splits, mask)
    with pytest.raises(TypeError, match="bool"):
        make_layout(splits, splits, ((1.0, 0), (1, 1)))
    other = make_layout(splits, splits, ((True, False), (False, True)))
    assert other.mask == ((True, False), (False, True)) and other != layout
    for stages in ((1, 1), (2, 1), (-1, 1), (0, 3)):
        with pytest.raises(ValueError, match="stages"):
            _call(stages=stages)
    with pytest.raises(TypeError, match="stages"):
        _call(stages=(0, True))


@pytest.mark.parametrize("kernel_size", [(0, 0), (0, 3), (3, 0)], ids=str)
@pytest.mark.parametrize("backend", KNOWN_BACKENDS)
def test_zero_size_kernel_is_refused_on_every_backend(backend, kernel_size):
    """Checked before a backend is chosen (the cpp kernels used to return the bias alone)."""
    with pytest.raises(ValueError, match=r"weight must have a kernel size >= 1"):
        _call(weight=torch.randn(6, 4, *kernel_size), bias=torch.randn(6), backend=backend)


def test_cpp_rejects_unsupported_dtype():
    require_backend("cpp")
    with pytest.raises(TypeError, match="backend 'cpp' supports"):
        bf16 = dict(dtype=torch.bfloat16)
        _call(input=torch.randn(1, 4, 5, 5, **bf16), weight=torch.randn(6, 4, 3, 3, **bf16), backend="cpp")


def test_nested_linear_bad_input():
    with pytest.raises(ValueError, match="input must be 2-D"):
        nested_linear(torch.randn(2, 4, 1), torch.randn(6, 4), **GOOD)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        nested_linear(torch.randn(2, 4), torch.randn(6, 4, 1, 1), **GOOD)


# ----------------------------------------------------------------------------------------------
# torch.library integration
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    require_backend(backend)
    case = CASES[3]
    input, weight, bias = case.tensors(torch.float64, channels_last=False)
    layout = case.layout
    splits = [list(layout.in_splits), list(layout.out_splits), list(layout.flat_mask)]
    options = [*splits, [1, 1], [0, 0], [1, 1], 1, 3, backend]
    input.requires_grad_(True)
    weight.requires_grad_(True)
    torch.library.opcheck(torch.ops.rdn.nested_conv2d.default, (input, weight, bias, *options))
    out = torch.zeros(2, sum(case.out_splits), 5, 6, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.rdn.nested_conv2d_out.default, (input.detach(), weight.detach(), bias, *options, out)
    )
    grad_output = torch.randn(2, sum(case.out_splits[1:3]), 5, 6, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.rdn.nested_conv2d_backward.default,
        (grad_output, input.detach(), weight.detach(), True, *options, True, True),
    )


def test_torch_compile_matches_eager():
    case = CASES[7]
    input, weight, bias = case.tensors(torch.float32, channels_last=False)

    def block(x):
        y = nested_conv2d(x, weight, bias, **case.conv_kwargs)
        return torch.relu(y) * 2

    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(input), block(input))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
@pytest.mark.parametrize("with_out", [False, True])
def test_jit_trace_records_the_computation_not_a_constant(with_out):
    """Traced on plain tensors without grad, the eager fast path used to be frozen into a constant."""
    case = CASES[7]
    input, weight, bias = case.tensors(torch.float32, channels_last=False)
    kwargs = {**case.conv_kwargs, "stages": (1, case.layout.num_groups)} if with_out else case.conv_kwargs

    def call(x):
        out = torch.zeros(x.shape[0], weight.shape[0], *reference(x).shape[2:]) if with_out else None
        return nested_conv2d(x, weight, bias, **kwargs, out=out)

    def reference(x):
        return nested_conv2d(x, weight, bias, **kwargs, backend="torch")

    with torch.no_grad():
        traced = torch.jit.trace(call, input)
        other = torch.randn_like(input)
        assert_close(traced(other), call(other), what="traced on new input")
    assert "rdn::" not in str(traced.graph)


def test_plain_eager_calls_skip_the_dispatcher(monkeypatch):
    """A module's nn.Parameter weights are plain tensors: inference calls the backend directly, and
    training records an autograd.Function of the same backend; neither goes through the registered op."""
    import rdn_kernels.nested_conv as op_module

    def refuse(*args, **kwargs):
        raise AssertionError("the registered op was called in plain eager mode")

    case = CASES[2]
    input, weight, bias = case.tensors(torch.float32, channels_last=False)
    expected = nested_conv2d(input, weight, bias, **case.conv_kwargs, backend="torch")
    monkeypatch.setattr(op_module, "_nested_conv2d_op", refuse)
    monkeypatch.setattr(op_module, "_nested_conv2d_out_op", refuse)
    weight, bias = torch.nn.Parameter(weight), torch.nn.Parameter(bias)
    with torch.no_grad():
        assert_close(nested_conv2d(input, weight, bias, **case.conv_kwargs), expected, what="inference")
    trained = nested_conv2d(input, weight, bias, **case.conv_kwargs)
    assert trained.grad_fn is not None
    assert_close(trained, expected, what="training forward")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("with_out", [False, True])
def test_eager_training_matches_the_registered_op(backend, with_out):
    """The eager autograd.Function and the registered op's autograd formula give the same values and
    gradients (the op is forced by a dispatch mode, under which plain eager no longer holds)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    require_backend(backend)

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    case = CASES[7]
    lo = 1 if with_out else 0
    kwargs = {**case.conv_kwargs, "stages": (lo, case.layout.num_groups), "backend": backend}

    def run(mode):
        input, weight, bias = (t.detach().requires_grad_() for t in case.tensors(torch.float64, channels_last=False))
        with mode:
            out = torch.zeros_like(input[:, :1]).expand(-1, weight.shape[0], -1, -1).contiguous() if with_out else None
            result = nested_conv2d(input, weight, bias, **kwargs, out=out)
            (result * torch.linspace(-1, 1, result.numel(), dtype=result.dtype).view_as(result)).sum().backward()
        return result.detach(), input.grad, weight.grad, bias.grad

    for eager, registered, what in zip(run(contextlib.nullcontext()), run(PassThrough()),
                                       ("output", "grad_input", "grad_weight", "grad_bias"), strict=True):  # fmt: skip
        assert_close(eager, registered, what=what)


def test_autocast_runs_the_op_in_the_autocast_dtype_as_conv2d():
    """Under torch.autocast the operands are cast as F.conv2d's are (the default GPU training loop
    runs under autocast: a nested layer after a stock conv got a bfloat16 input and refused it)."""
    case = CASES[2]
    input, weight, bias = (t.requires_grad_() for t in case.tensors(torch.float32, channels_last=False))
    stock = torch.nn.Conv2d(input.shape[1], input.shape[1], 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = stock(input)
        result = nested_conv2d(features, weight, bias, **case.conv_kwargs)
        linear = nested_linear(features[:, :, 0, 0], weight[:, :, 0, 0].contiguous(), bias,
                               in_splits=case.in_splits, out_splits=case.out_splits)  # fmt: skip
    assert features.dtype == result.dtype == linear.dtype == torch.bfloat16
    expected = nested_conv2d(features.detach(), weight.detach().bfloat16(), bias.detach().bfloat16(),
                             **case.conv_kwargs)  # fmt: skip
    assert_close(result, expected, what="under autocast")
    result.float().sum().backward()
    assert input.grad.dtype == weight.grad.dtype == bias.grad.dtype == torch.float32  # the master weights
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


def test_autocast_leaves_float64_and_asks_out_for_its_dtype():
    case = CASES[2]
    input, weight, bias = case.tensors(torch.float64, channels_last=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert nested_conv2d(input, weight, bias, **case.conv_kwargs).dtype == torch.float64  # as F.conv2d
        single = [t.float() for t in (input, weight, bias)]
        full = nested_conv2d(*single, **case.conv_kwargs)
        with pytest.raises(TypeError, match="under torch.autocast the op computes in torch.bfloat16"):
            nested_conv2d(*single, **case.conv_kwargs, out=torch.empty(full.shape))
        out = torch.full(full.shape, float("nan"), dtype=torch.bfloat16)
        assert nested_conv2d(*single, **case.conv_kwargs, out=out) is out
    assert_close(out, full, what="out= under autocast")


def test_double_backward_is_refused_not_silently_zero():
    case = CASES[2]
    input, weight, bias = (t.requires_grad_() for t in case.tensors(torch.float64, channels_last=False))
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(nested_conv2d(input, weight, bias, **case.conv_kwargs).square().sum(), input,
                            create_graph=True)  # fmt: skip


def test_registered_op_visible_to_dispatch_modes():
    """Plain eager inference calls the backend directly; anything watching the dispatcher sees the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    case = CASES[2]
    input, weight, bias = case.tensors(torch.float32, channels_last=False)
    eager = nested_conv2d(input, weight, bias, **case.conv_kwargs)
    out = torch.zeros_like(eager)
    with Recorder() as recorder:
        watched = nested_conv2d(input, weight, bias, **case.conv_kwargs)
        nested_conv2d(input, weight, bias, **case.conv_kwargs, stages=(1, 2), out=out)
    assert "rdn.nested_conv2d.default" in recorder.ops and "rdn.nested_conv2d_out.default" in recorder.ops
    torch.testing.assert_close(watched, eager)
