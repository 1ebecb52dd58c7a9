"""Output buffers the kernels allocate start as NaN in the tests (tests/conftest.py), and every
backend overwrites all of them: an element a kernel forgets to write cannot pass."""

from __future__ import annotations

import math

import pytest
import torch

from rdn_kernels import _extension, _memory, nested_conv2d
from tests.kernels.availability import require_backend
from tests.kernels.test_nested_conv import Case
from tests.utils import assert_close

BACKENDS = ["torch", "cpp", "triton"]


@pytest.fixture
def fill_value():
    """Restores the session's fill after a test changes it."""
    previous = _memory.uninitialized_fill()
    yield
    _memory.set_uninitialized_fill(previous)


def test_python_buffers_start_as_nan():
    assert math.isnan(_memory.uninitialized_fill())
    assert _memory.empty((3, 4), dtype=torch.float32, device=torch.device("cpu")).isnan().all()
    like = _memory.empty_like(torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last))
    assert like.isnan().all() and like.is_contiguous(memory_format=torch.channels_last)
    # Integer buffers are left alone (nothing to fill them with that a comparison would catch).
    assert _memory.empty((3,), dtype=torch.int32, device=torch.device("cpu")).dtype == torch.int32


def test_cpp_buffers_start_as_nan():
    require_backend("cpp")
    extension = _extension.extension()
    assert math.isnan(extension.uninitialized_fill())
    assert extension.empty_like(torch.zeros(2, 3, dtype=torch.float64)).isnan().all()
    assert extension.empty_like(torch.zeros(3, dtype=torch.int64)).dtype == torch.int64


@pytest.mark.usefixtures("fill_value")
def test_fill_switch_reaches_both_allocators():
    _memory.set_uninitialized_fill(1.5)
    assert (_memory.empty((4,), dtype=torch.float64, device=torch.device("cpu")) == 1.5).all()
    if _extension.has_cpu_kernels():
        assert (_extension.extension().empty_like(torch.zeros(4)) == 1.5).all()
    _memory.set_uninitialized_fill(None)
    assert _memory.uninitialized_fill() is None
    if _extension.has_cpu_kernels():
        assert _extension.extension().uninitialized_fill() is None
    with pytest.raises(TypeError, match="value must be a float"):
        _memory.set_uninitialized_fill("nan")


def test_fill_environment_variable():
    assert math.isnan(_memory._parse_fill("nan")) and _memory._parse_fill("-1e30") == -1e30
    assert _memory._parse_fill(None) is None and _memory._parse_fill("") is None and _memory._parse_fill("off") is None
    with pytest.raises(ValueError, match=_memory.FILL_ENV):
        _memory._parse_fill("garbage")


def test_an_unwritten_element_fails_the_comparison():
    """What the fill buys: a kernel that skips one element cannot pass on memory that was zero."""
    expected = torch.zeros(2, 3)
    output = _memory.empty(expected.shape, dtype=expected.dtype, device=expected.device)
    output.view(-1)[:-1] = 0  # every element but the last written
    with pytest.raises(AssertionError):
        assert_close(output, expected)


# Odd shapes: zero-size groups on either side, stages made only of them, strided k×k, 1×1 paths.
ODD_CASES = [
    Case((3, 0, 4), (2, 3, 0)),
    Case((0, 5, 2), (0, 4, 3), kernel=3, padding=1, size=(7, 3)),
    Case((3, 4), (5, 2), kernel=3, stride=2, padding=1, size=(5, 7)),
    Case((2, 3, 1, 4), (3, 1, 4, 2), block_mask=((1, 0, 0, 0), (0, 0, 0, 0), (1, 0, 1, 0), (0, 1, 0, 1))),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", ODD_CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_output_and_gradient_element_is_written(backend, case, channels_last):
    require_backend(backend)
    input, weight, bias = case.tensors(torch.float64, channels_last)
    num_groups = len(case.in_splits)
    # All groups, the first and the last alone (in ODD_CASES some of those are all zero-size).
    # The Triton interpreter takes seconds per case: all groups only, test_nested_conv_triton
    # checks its stages against the reference (on NaN-filled buffers as well).
    stages_list = [None] if backend == "triton" else [None, (0, 1), (num_groups - 1, num_groups)]
    for stages in dict.fromkeys(stages_list):
        leaves = [t.detach().clone().requires_grad_(True) for t in (input, weight, bias)]
        output = nested_conv2d(*leaves, **case.conv_kwargs, stages=stages, backend=backend)
        assert output.isfinite().all(), f"unwritten output elements, stages={stages}"
        grads = torch.autograd.grad(output, leaves, torch.ones_like(output))
        for name, grad in zip(("input", "weight", "bias"), grads, strict=True):
            assert grad.isfinite().all(), f"unwritten grad {name} elements, stages={stages}"
