"""The ``out=`` contract of nested_conv2d / nested_linear, identical on every backend.

As PyTorch's own ``out=`` ops: ``out`` overlapping itself or an operand is refused; the write is
an in-place op (version counter bumped, so overwriting a tensor saved for backward is detected);
under grad mode the write is recorded by autograd, and ``out`` that is a leaf requiring grad is
refused as for any in-place op. The refusals happen in the shared argument checks, before any
backend is chosen, so they are asserted for every backend name (``cuda`` included). Triton runs
these tests in the TRITON_INTERPRET=1 subprocess of ``test_nested_conv_triton.py``.
"""

from __future__ import annotations

import pytest
import torch

from rdn_kernels import nested_conv2d, nested_linear
from rdn_kernels._memory import has_internal_overlap, overlaps
from rdn_kernels.backends import KNOWN_BACKENDS
from tests.kernels.availability import require_backend
from tests.utils import assert_close

BACKENDS = ["torch", "cpp", "triton"]
# A k×k conv keeping the spatial size and the channel count, so that out can alias input exactly.
CONV = dict(in_splits=(2, 3), out_splits=(3, 2), padding=1)
SHAPE = (2, 5, 5, 6)  # (N, C = D, H, W) of input and output


def _operands(dtype: torch.dtype = torch.float64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input = torch.randn(SHAPE, generator=generator, dtype=dtype)
    weight = torch.randn(5, 5, 3, 3, generator=generator, dtype=dtype) / 6
    bias = torch.randn(5, generator=generator, dtype=dtype)
    return input, weight, bias


def _reference(input, weight, bias, **kwargs):
    return nested_conv2d(input.detach().clone(), weight.detach(), bias.detach(), **CONV, **kwargs, backend="torch")


# ----------------------------------------------------------------------------------------------
# Overlap: refused with a ValueError naming out and the operand
# ----------------------------------------------------------------------------------------------

NUMEL = 2 * 5 * 5 * 6


def _out_is_input():
    input, weight, bias = _operands()
    return input, weight, bias, input, "input"


def _out_is_a_view_of_input():
    input, weight, bias = _operands()
    return input, weight, bias, input[:], "input"


def _dense_views_sharing_elements():
    buffer = torch.randn(NUMEL + 30, dtype=torch.float64)
    _, weight, bias = _operands()
    return buffer[:NUMEL].view(SHAPE), weight, bias, buffer[30:].view(SHAPE), "input"


def _channel_slices_sharing_channels():
    # Neither view is dense: ATen calls this "too hard" and lets it through; the check is exact.
    buffer = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    _, weight, bias = _operands()
    return buffer[:, :5], weight, bias, buffer[:, 3:8], "input"


def _out_overlaps_weight():
    buffer = torch.randn(225 + NUMEL - 5, dtype=torch.float64)
    input, _, bias = _operands()
    weight = torch.nn.Parameter(buffer[:225].view(5, 5, 3, 3), requires_grad=False)  # as a module holds it
    return input, weight, bias, buffer[220:].view(SHAPE), "weight"


def _out_overlaps_bias():
    buffer = torch.randn(NUMEL + 3, dtype=torch.float64)
    input, weight, _ = _operands()
    return input, weight, buffer[NUMEL - 2 :], buffer[:NUMEL].view(SHAPE), "bias"


ALIASED = [
    _out_is_input,
    _out_is_a_view_of_input,
    _dense_views_sharing_elements,
    _channel_slices_sharing_channels,
    _out_overlaps_weight,
    _out_overlaps_bias,
]


@pytest.mark.parametrize("make", ALIASED, ids=lambda make: make.__name__.strip("_"))
@pytest.mark.parametrize("backend", KNOWN_BACKENDS)
def test_out_overlapping_an_operand_is_refused(backend, make):
    input, weight, bias, out, name = make()
    before = out.clone()
    with pytest.raises(ValueError, match=f"out overlaps {name}"):
        nested_conv2d(input, weight, bias, **CONV, out=out, backend=backend)
    assert torch.equal(out, before), "a refused call must not write"


@pytest.mark.parametrize(
    "out",
    [
        torch.zeros(1, 1, 1, 1, dtype=torch.float64).expand(SHAPE),  # stride 0
        torch.zeros(NUMEL, dtype=torch.float64).as_strided(SHAPE, (150, 6, 6, 1)),  # channels and rows collide
    ],
    ids=["expanded", "as_strided"],
)
@pytest.mark.parametrize("backend", KNOWN_BACKENDS)
def test_out_overlapping_itself_is_refused(backend, out):
    input, weight, bias = _operands()
    with pytest.raises(ValueError, match="out has elements that share a memory location"):
        nested_conv2d(input, weight, bias, **CONV, out=out, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_disjoint_views_of_one_buffer_are_accepted(backend):
    """Input and out as disjoint channel slices of one feature map (DenseNet-style concatenation)."""
    require_backend(backend)
    input, weight, bias = _operands()
    features = torch.cat([input, torch.full(SHAPE, float("nan"), dtype=torch.float64)], dim=1)
    source, out = features[:, :5], features[:, 5:]
    expected = _reference(source, weight, bias, stages=(0, 1))
    nested_conv2d(source, weight, bias, **CONV, stages=(0, 1), out=out, backend=backend)
    assert_close(out[:, :3], expected)
    assert torch.equal(source, input) and out[:, 3:].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_with_an_interleaved_layout_is_accepted(backend):
    """Strides that are not nested but never collide (W, H dense; N and C interleaved) are fine."""
    require_backend(backend)
    input, weight, bias = _operands()
    out = torch.full((1000,), float("nan"), dtype=torch.float64).as_strided(SHAPE, (90, 60, 6, 1))
    assert not has_internal_overlap(out)
    nested_conv2d(input, weight, bias, **CONV, out=out, backend=backend)
    assert_close(out, _reference(input, weight, bias))


def test_overlap_predicates():
    buffer = torch.zeros(10)
    assert has_internal_overlap(buffer.as_strided((2, 2), (1, 1)))
    assert not has_internal_overlap(buffer.as_strided((2, 2), (3, 2)))  # {0, 2, 3, 5}
    assert not has_internal_overlap(buffer[::2]) and not has_internal_overlap(torch.zeros(0, 3).expand(0, 3))
    assert overlaps(buffer[::2], buffer[2:3]) and not overlaps(buffer[::2], buffer[1::2])
    assert not overlaps(buffer[:5], buffer[5:]) and not overlaps(buffer, torch.zeros(10))
    assert overlaps(buffer[:5], buffer[4:])
    # A view one byte apart (another dtype's elements straddle ours): compared byte by byte.
    bytes_ = torch.zeros(40, dtype=torch.uint8)
    assert overlaps(bytes_[:20].view(torch.int32)[::2], bytes_[1:].view(torch.uint8)[::8])
    assert not overlaps(bytes_[:20].view(torch.int32)[::2], bytes_[4:5])


def test_the_compiled_first_answer_never_passes_an_overlap():
    """``out_provably_disjoint`` (C++) answers the usual case before the exact predicates run: it may
    leave a disjoint pair to them, but must never call an overlapping pair disjoint."""
    require_backend("cpp")
    from rdn_kernels._extension import extension

    provably_disjoint = extension().out_provably_disjoint
    for make in ALIASED:  # out overlaps one operand in each
        input, weight, bias, out, _ = make()
        assert not provably_disjoint(out, [input, weight, bias]), make.__name__
    buffer = torch.zeros(10)
    assert not provably_disjoint(buffer.as_strided((2, 2), (1, 1)), [])  # overlaps itself
    assert not provably_disjoint(buffer[:5], [None, buffer[4:]])
    # The usual cases, proven: separate buffers, and dense slices of one buffer that do not meet.
    assert provably_disjoint(buffer[:5], [buffer[5:], torch.zeros(3), None])
    assert provably_disjoint(torch.zeros(4), [torch.zeros(0)])  # an empty operand addresses nothing
    # Interleaved channel slices are left to the exact check (their address ranges meet).
    features = torch.zeros(2, 8, 3, 3)
    assert not provably_disjoint(features[:, 4:], [features[:, :4]])
    assert not overlaps(features[:, 4:], features[:, :4])


# ----------------------------------------------------------------------------------------------
# In-place write seen by autograd
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_write_bumps_the_version_counter(backend, grad_mode):
    require_backend(backend)
    input, weight, bias = _operands()
    out = torch.zeros(SHAPE, dtype=torch.float64)
    version = out._version
    with torch.set_grad_enabled(grad_mode):
        nested_conv2d(input, weight, bias, **CONV, stages=(1, 2), out=out, backend=backend)
    assert out._version > version


@pytest.mark.parametrize("backend", BACKENDS)
def test_overwriting_a_tensor_saved_for_backward_is_detected(backend):
    require_backend(backend)
    input, weight, bias = _operands()
    scale = torch.ones((), dtype=torch.float64, requires_grad=True)
    saved = torch.zeros(SHAPE, dtype=torch.float64)
    loss = (saved * scale).sum()  # mul saves `saved` for the gradient of scale
    nested_conv2d(input, weight, bias, **CONV, out=saved, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("operands_need_grad", [False, True], ids=["only_out_in_graph", "operands_too"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_out_inside_a_graph_gets_the_write_recorded(backend, operands_need_grad):
    """Gradients flow through the written channels to the operands, not to what they overwrote."""
    require_backend(backend)
    input, weight, bias = (t.requires_grad_(operands_need_grad) for t in _operands())
    source = torch.randn(SHAPE, dtype=torch.float64, requires_grad=True)
    out = source * 2  # a non-leaf: part of a graph
    result = nested_conv2d(input, weight, bias, **CONV, stages=(0, 1), out=out, backend=backend)
    assert result is out
    grad = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result.backward(grad)

    expected_source = 2 * grad
    expected_source[:, :3] = 0  # group 0 (channels 0..2) was overwritten
    assert_close(source.grad, expected_source)
    if operands_need_grad:
        direct = [t.detach().clone().requires_grad_(True) for t in (input, weight, bias)]
        nested_conv2d(*direct, **CONV, stages=(0, 1), backend="torch").backward(grad[:, :3])
        for name, leaf, twin in zip(("input", "weight", "bias"), (input, weight, bias), direct, strict=True):
            assert_close(leaf.grad, twin.grad, what=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_returns_out_itself_with_the_write_recorded(backend):
    """nested_linear writes through a 4-D view of ``out`` and returns ``out`` itself, as PyTorch's
    ``out=`` ops do; gradients reach the operands through it and skip the overwritten channels."""
    require_backend(backend)
    generator = torch.Generator().manual_seed(3)
    input, weight, bias = (torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
                           for shape in ((4, 5), (5, 5), (5,)))  # fmt: skip
    source = torch.randn(4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    out = source * 2  # a non-leaf: part of a graph
    splits = dict(in_splits=(2, 3), out_splits=(3, 2))
    result = nested_linear(input, weight, bias, **splits, stages=(1, 2), out=out, backend=backend)
    assert result is out
    grad = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    result.backward(grad)
    expected_source = 2 * grad
    expected_source[:, 3:] = 0  # group 1 (channels 3..4) was overwritten
    assert_close(source.grad, expected_source)
    direct = [t.detach().clone().requires_grad_(True) for t in (input, weight, bias)]
    nested_linear(*direct, **splits, stages=(1, 2), backend="torch").backward(grad[:, 3:])
    for name, leaf, twin in zip(("input", "weight", "bias"), (input, weight, bias), direct, strict=True):
        assert_close(leaf.grad, twin.grad, what=f"grad {name}")


@pytest.mark.parametrize("backend", KNOWN_BACKENDS)
def test_leaf_out_that_requires_grad_is_refused_under_grad_mode(backend):
    input, weight, bias = _operands()
    out = torch.zeros(SHAPE, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="out is .*a leaf tensor that requires grad"):
        nested_conv2d(input, weight, bias, **CONV, out=out, backend=backend)
    linear_out = torch.zeros(4, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="out is .*a leaf tensor that requires grad"):
        nested_linear(torch.randn(4, 5, dtype=torch.float64), weight[:, :, 0, 0], bias, in_splits=(2, 3),
                      out_splits=(3, 2), out=linear_out, backend=backend)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_leaf_out_that_requires_grad_is_written_under_no_grad(backend):
    """As for any in-place op (an optimizer step, say): allowed when autograd is off."""
    require_backend(backend)
    input, weight, bias = _operands()
    out = torch.zeros(SHAPE, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        nested_conv2d(input, weight, bias, **CONV, out=out, backend=backend)
    assert_close(out.detach(), _reference(input, weight, bias))
