"""backend="cuda" on CUDA tensors against float64 references on the CPU (no Triton involved).

The 1×1 cases exercise both instantiations of the tensor-core kernel (16-byte aligned channel runs
→ cp.async; ragged runs, or a misaligned base pointer → guarded loads), several pixel, output and
K tiles per group, more groups and more runs than one launch takes, zero-size groups and sparse
masks; the k×k cases exercise the per-group cuDNN path of the glue. Oracle: one float64
``F.conv2d`` with the masked weight (``masked_dense``), sliced to the stage's channels.
"""

from __future__ import annotations

import pytest
import torch

import rdn_kernels
from rdn_kernels import make_layout, nested_conv2d, nested_linear
from tests.kernels.test_nested_conv import CASES, SPARSE_4, Case, _read_blocks, masked_dense, stage_ranges
from tests.utils import assert_close, nan_filled_like

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def cuda_backend():
    """Skip without a GPU or without the CUDA kernels; pin the cuDNN / cuBLAS precision flags."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if "cuda" not in rdn_kernels.available_backends("cuda"):
        pytest.skip("the extension was built without CUDA kernels (build with torch+CUDA and nvcc: make build)")
    # fp32 products in fp32 (no TF32), and 16-bit cuBLAS products (grad_weight) reduced in fp32.
    matmul = torch.backends.cuda.matmul
    flags = ("allow_tf32", "allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction")
    saved = {flag: getattr(matmul, flag) for flag in flags}
    for flag in flags:
        setattr(matmul, flag, False)
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        for flag, value in saved.items():
            setattr(matmul, flag, value)


def _alternating_mask(num_groups: int) -> tuple[tuple[bool, ...], ...]:
    """Output group j reads input groups j, j-2, j-4, …: every group reads many separate runs."""
    return tuple(tuple(i <= j and (j - i) % 2 == 0 for i in range(num_groups)) for j in range(num_groups))


POINTWISE_CASES = [
    Case((40, 48, 72), (64, 72, 136), size=(17, 19)),  # aligned runs: cp.async; 3 output tiles, 5 K-steps
    Case((7, 63, 30), (5, 70, 66), batch=3, size=(9, 11)),  # ragged runs: guarded loads, partial tiles
    Case((8, 16, 8, 24), (24, 8, 16, 40), size=(13, 13), block_mask=SPARSE_4),  # two runs per group
    Case((256, 256), (128, 72), batch=1, size=(8, 8)),  # 16 K-steps: the stage ring wraps many times
    Case((2,) * 40, (3,) * 40, batch=1, size=(4, 5)),  # 40 groups: two launches
    Case((2,) * 40, (3,) * 40, batch=1, size=(4, 5), block_mask=_alternating_mask(40)),  # > 64 runs: split by runs
    Case((24, 0, 40), (0, 32, 8), batch=1, size=(1, 1)),  # zero-size groups; (N, C, 1, 1)
]
ALL_CASES = CASES + POINTWISE_CASES
BACKWARD_CASES = [CASES[3], CASES[4], CASES[7], *POINTWISE_CASES[:2], *POINTWISE_CASES[5:]]


def _tensors(case: Case, dtype: torch.dtype, channels_last: bool):
    """(input, weight, bias) on the GPU in ``dtype``, and their exact float64 CPU copies."""
    tensors64 = case.tensors(torch.float64, channels_last=False)
    low = [t.to(dtype) for t in tensors64]
    exact = [t.double() for t in low]  # the reference sees exactly the values the kernel sees
    gpu = [t.cuda() for t in low]
    if channels_last:
        gpu[0] = gpu[0].to(memory_format=torch.channels_last)
    return gpu, exact


def _expected(case: Case, exact, stages) -> torch.Tensor:
    full = masked_dense(*exact, case)
    if stages is None:
        return full
    layout = make_layout(case.in_splits, case.out_splits, case.conv_kwargs["block_mask"])
    return full[:, layout.out_offsets[stages[0]] : layout.out_offsets[stages[1]]]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_forward_matches_reference(case, dtype, channels_last):
    (input, weight, bias), exact = _tensors(case, dtype, channels_last)
    layout = make_layout(case.in_splits, case.out_splits, case.conv_kwargs["block_mask"])
    for stages in stage_ranges(layout.num_groups):
        for with_bias in (True, False):
            actual = nested_conv2d(
                input, weight, bias if with_bias else None, **case.conv_kwargs, stages=stages, backend="cuda"
            )
            expected = _expected(case, exact if with_bias else [*exact[:2], None], stages)
            assert actual.dtype == dtype and actual.is_cuda
            assert_close(actual.cpu(), expected, dtype, what=f"stages={stages}, bias={with_bias}")
            if channels_last and min(actual.shape[1:]) > 1:
                assert actual.is_contiguous(memory_format=torch.channels_last), "output should follow the input layout"
            if not channels_last:
                assert actual.is_contiguous()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw-out", "nhwc-out"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_stages_write_into_out_slice(case, dtype, channels_last):
    """Stage by stage into one NaN-filled buffer, as dynamic inference does: each call writes only its slice."""
    (input, weight, bias), exact = _tensors(case, dtype, channels_last)
    layout = make_layout(case.in_splits, case.out_splits, case.conv_kwargs["block_mask"])
    full = _expected(case, exact, None)
    out = nan_filled_like(full.to(dtype)).cuda()
    if channels_last:  # channels_last out: the kernel writes straight into the slice; NCHW out: via a copy
        out = out.to(memory_format=torch.channels_last)
    for stage in range(layout.num_groups):
        before = out.clone()
        stages = (stage, stage + 1)
        result = nested_conv2d(input, weight, bias, **case.conv_kwargs, stages=stages, out=out, backend="cuda")
        assert result is out
        start, stop = layout.out_offsets[stage], layout.out_offsets[stage + 1]
        torch.testing.assert_close(out[:, :start], before[:, :start], equal_nan=True, atol=0, rtol=0)
        torch.testing.assert_close(out[:, stop:], before[:, stop:], equal_nan=True, atol=0, rtol=0)
    assert_close(out.cpu(), full, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [CASES[2], POINTWISE_CASES[0], POINTWISE_CASES[1]], ids=str)
def test_multi_group_stage_into_out(case, dtype):
    """stages=(lo, hi) spanning several groups in one launch, into a channels_last buffer."""
    (input, weight, bias), exact = _tensors(case, dtype, channels_last=True)
    layout = make_layout(case.in_splits, case.out_splits, case.conv_kwargs["block_mask"])
    lo, hi = (1, layout.num_groups) if layout.num_groups > 1 else (0, 1)
    full = _expected(case, exact, None)
    out = nan_filled_like(full.to(dtype)).cuda().to(memory_format=torch.channels_last)
    nested_conv2d(input, weight, bias, **case.conv_kwargs, stages=(lo, hi), out=out, backend="cuda")
    start, stop = layout.out_offsets[lo], layout.out_offsets[hi]
    assert torch.isnan(out[:, :start]).all()
    assert_close(out[:, start:stop].cpu(), full[:, start:stop], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefix_input_and_poisoned_later_groups(dtype):
    """stages=(0, s) reads only the first s input groups: a prefix input works, NaN in later groups is never read."""
    case = POINTWISE_CASES[0]
    (input, weight, bias), exact = _tensors(case, dtype, channels_last=True)
    layout = make_layout(case.in_splits, case.out_splits)
    full = _expected(case, exact, None)
    for s in range(1, layout.num_groups + 1):
        expected = full[:, : layout.out_offsets[s]]
        prefix = input[:, : layout.in_offsets[s]].contiguous(memory_format=torch.channels_last)
        actual = nested_conv2d(prefix, weight, bias, **case.conv_kwargs, stages=(0, s), backend="cuda")
        assert_close(actual.cpu(), expected, dtype, what=f"prefix s={s}")
        poisoned_input, poisoned_weight = input.clone(), weight.clone()
        poisoned_input[:, layout.in_offsets[s] :] = float("nan")
        poisoned_weight[: layout.out_offsets[s], layout.in_offsets[s] :] = float("nan")
        poisoned = nested_conv2d(
            poisoned_input, poisoned_weight, bias, **case.conv_kwargs, stages=(0, s), backend="cuda"
        )
        torch.testing.assert_close(poisoned, actual, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_base_pointer(dtype):
    """A channels_last input whose data starts 1 element past a 16-byte boundary takes the guarded loads."""
    case = POINTWISE_CASES[0]
    (input, weight, bias), exact = _tensors(case, dtype, channels_last=True)
    storage = torch.empty(input.numel() + 1, dtype=dtype, device="cuda")
    shifted = storage[1:].view(input.shape[0], *input.shape[2:], input.shape[1]).permute(0, 3, 1, 2)
    shifted.copy_(input)
    assert shifted.is_contiguous(memory_format=torch.channels_last) and shifted.data_ptr() % 16 != 0
    actual = nested_conv2d(shifted, weight, bias, **case.conv_kwargs, backend="cuda")
    assert_close(actual.cpu(), _expected(case, exact, None), dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=str)
def test_backward_matches_reference(case, dtype, channels_last):
    (input, weight, bias), exact = _tensors(case, dtype, channels_last)
    layout = make_layout(case.in_splits, case.out_splits, case.conv_kwargs["block_mask"])
    for stages in stage_ranges(layout.num_groups):
        leaves = [t.detach().clone().requires_grad_(True) for t in (input, weight, bias)]
        output = nested_conv2d(*leaves, **case.conv_kwargs, stages=stages, backend="cuda")
        grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        grads = torch.autograd.grad(output, leaves, grad_output.to(dtype).cuda())

        leaves64 = [t.detach().clone().requires_grad_(True) for t in exact]
        expected_output = _expected(case, leaves64, stages)
        expected = torch.autograd.grad(expected_output, leaves64, grad_output.to(dtype).double())
        for name, grad, want in zip(("input", "weight", "bias"), grads, expected, strict=True):
            assert grad.dtype == dtype
            assert_close(grad.cpu(), want, dtype, what=f"grad {name}, stages={stages}")
        lo, hi = stages or (0, layout.num_groups)
        untouched = ~_read_blocks(layout, lo, hi, weight.shape)
        assert torch.all(grads[1].cpu()[untouched] == 0), "blocks outside the mask / stages must get exactly zero"


@pytest.mark.parametrize("trainable", [0, 1], ids=["input-only", "weight-only"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [POINTWISE_CASES[1], CASES[7]], ids=str)
def test_backward_of_one_operand(case, dtype, trainable):
    """Only the input, or only the weight, requires grad: the other gradient is never computed."""
    (input, weight, bias), exact = _tensors(case, dtype, channels_last=True)
    stages = (1, len(case.in_splits))
    leaves = [t.detach().clone().requires_grad_(index == trainable) for index, t in enumerate((input, weight))]
    output = nested_conv2d(*leaves, bias, **case.conv_kwargs, stages=stages, backend="cuda")
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    (grad,) = torch.autograd.grad(output, leaves[trainable], grad_output.cuda())

    leaves64 = [t.detach().clone().requires_grad_(True) for t in exact]
    (expected,) = torch.autograd.grad(_expected(case, leaves64, stages), leaves64[trainable], grad_output.double())
    assert_close(grad.cpu(), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nested_linear(dtype):
    in_splits, out_splits = (16, 0, 40, 9), (24, 8, 33, 0)
    case = Case(in_splits, out_splits, batch=37, size=(1, 1))
    (input, weight, bias), exact = _tensors(case, dtype, channels_last=False)
    input2d, weight2d = input[:, :, 0, 0], weight[:, :, 0, 0]
    full = _expected(case, exact, None)[:, :, 0, 0]
    splits = dict(in_splits=in_splits, out_splits=out_splits)
    output = nested_linear(input2d, weight2d, bias, **splits, backend="cuda")
    assert output.shape == (37, 65)
    assert_close(output.cpu(), full, dtype)
    out = torch.zeros(37, 65, dtype=dtype, device="cuda")
    nested_linear(input2d, weight2d, bias, **splits, stages=(1, 3), out=out, backend="cuda")
    assert_close(out[:, 24:65].cpu(), full[:, 24:65], dtype)
    assert torch.all(out[:, :24] == 0)


def test_backend_choice_by_dtype():
    device = torch.device("cuda")
    for dtype in DTYPES:
        assert rdn_kernels.backends.resolve_backend("auto", device, dtype) == "cuda"
    assert rdn_kernels.backends.resolve_backend("auto", device, torch.float64) != "cuda"
    with pytest.raises(TypeError, match="backend 'cuda' supports"):
        rdn_kernels.backends.resolve_backend("cuda", device, torch.float64)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_more_than_2_to_the_31_elements(dtype):
    """N·H·W·C > 2^31: pixel offsets must be 64-bit. Checks the last pixels against the reference."""
    in_splits, out_splits = (32, 32), (32, 32)
    batch, height, width = 1, 6000, 6000  # 36 M pixels × 64 channels: the last rows start past element 2^31
    generator = torch.Generator(device="cuda").manual_seed(0)
    input = torch.randn(batch, height, width, 64, generator=generator, device="cuda", dtype=dtype).permute(0, 3, 1, 2)
    assert input.numel() > 2**31
    weight = torch.randn(64, 64, 1, 1, generator=generator, device="cuda", dtype=dtype)
    bias = torch.randn(64, generator=generator, device="cuda", dtype=dtype)
    output = nested_conv2d(input, weight, bias, in_splits=in_splits, out_splits=out_splits, backend="cuda")
    assert (height - 2) * width * 64 > 2**31
    tail = input[:, :, -2:].double().cpu()  # the last two rows of pixels, all past element 2^31
    case = Case(in_splits, out_splits)
    expected = masked_dense(tail, weight.double().cpu(), bias.double().cpu(), case)
    assert_close(output[:, :, -2:].cpu(), expected, dtype)


def test_fp32_follows_the_cudnn_tf32_flag():
    """fp32 with ``torch.backends.cudnn.allow_tf32`` (torch's default): the op rounds like a dense
    cuDNN convolution under the same flag (TF32 products); without it, exact fp32."""
    case = POINTWISE_CASES[0]
    (x, w, b), exact = _tensors(case, torch.float32, channels_last=True)
    expected = _expected(case, exact, None)
    exact_fp32 = nested_conv2d(x, w, b, backend="cuda", **case.conv_kwargs)
    torch.testing.assert_close(exact_fp32.double().cpu(), expected, atol=1e-4, rtol=1e-4)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        tf32 = nested_conv2d(x, w, b, backend="cuda", **case.conv_kwargs)
        dense = masked_dense(x, w, b, case)  # cuDNN on the masked weight
    torch.testing.assert_close(tf32.double().cpu(), expected, atol=2e-2, rtol=2e-2)  # TF32 keeps 10 mantissa bits
    torch.testing.assert_close(tf32, dense, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kxk_grad_input_sums_blocks_in_fp32(dtype):
    """A k×k input channel read by many output groups: its grad sums one block per group. Summed in
    fp32 and rounded once, it stays within one 16-bit rounding of the float64 reference."""
    case = Case((8,) * 8, (8,) * 8, kernel=3, padding=1, size=(9, 9))
    (x, w, b), exact = _tensors(case, dtype, channels_last=False)
    x.requires_grad_(True)
    y = nested_conv2d(x, w, b, backend="cuda", **case.conv_kwargs)
    grad = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, x, grad)
    x64 = exact[0].clone().requires_grad_(True)
    (want,) = torch.autograd.grad(masked_dense(x64, exact[1], exact[2], case), x64, grad.double().cpu())
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.double().cpu(), want, atol=8 * eps * want.abs().max().item(), rtol=4 * eps)
