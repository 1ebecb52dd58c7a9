"""backend="auto" takes a self-checked backend only after it matched the reference on that device and dtype.

Production checks CUDA devices only; these tests add "cpu" to the checked device types and use
the ``cpp`` backend (healthy, or broken on purpose) to exercise the mechanism without a GPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import rdn_kernels.backends as backends
import rdn_kernels.nested_conv.cpp as cpp_backend
from rdn_kernels import nested_conv2d
from rdn_kernels.nested_conv import self_check
from tests.kernels.availability import require_backend

CPU, FLOAT = torch.device("cpu"), torch.float32


@pytest.fixture
def checked_cpu(monkeypatch):
    """CPU devices self-checked, with fresh verdicts (and none left behind for other tests)."""
    require_backend("cpp")
    monkeypatch.setattr(backends, "SELF_CHECKED_DEVICE_TYPES", frozenset({"cpu", "cuda"}))
    monkeypatch.delenv("RDN_KERNELS_SELF_CHECK", raising=False)
    self_check._verdict.cache_clear()
    yield
    self_check._verdict.cache_clear()


@pytest.fixture
def broken_cpp(monkeypatch):
    """The cpp forward gets one output element wrong."""
    real = cpp_backend.forward

    def wrong(*args, **kwargs):
        result = real(*args, **kwargs)
        if result.numel():
            result[(0,) * result.dim()] += 1.0
        return result

    monkeypatch.setattr(cpp_backend, "forward", wrong)


def test_healthy_backends_pass(checked_cpu):
    for dtype in (torch.float32, torch.float64):
        self_check.self_check("cpp", CPU, dtype)
    self_check.self_check("torch", CPU, torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve_backend("auto", CPU, FLOAT, verify=self_check.passes_self_check) == "cpp"


def test_a_wrong_backend_fails_and_auto_falls_back_with_one_warning(checked_cpu, broken_cpp):
    with pytest.raises(self_check.SelfCheckFailure, match=r"forward, 1x1 .* elements off"):
        self_check.self_check("cpp", CPU, FLOAT)
    x, w = torch.randn(2, 6, 4, 4), torch.randn(6, 6, 1, 1)
    with pytest.warns(RuntimeWarning, match=r"backend 'cpp' failed its self-check on cpu with torch.float32"):
        y = nested_conv2d(x, w, in_splits=(3, 3), out_splits=(3, 3))
    torch.testing.assert_close(y, nested_conv2d(x, w, in_splits=(3, 3), out_splits=(3, 3), backend="torch"))
    with warnings.catch_warnings():  # the verdict is kept: no second check, no second warning
        warnings.simplefilter("error")
        assert backends.resolve_backend("auto", CPU, FLOAT, verify=self_check.passes_self_check) == "torch"
        # Asked for by name, the backend runs as asked (its result is the user's to judge).
        assert backends.resolve_backend("cpp", CPU, FLOAT, verify=self_check.passes_self_check) == "cpp"


def test_a_backend_that_raises_fails_the_check(checked_cpu, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(cpp_backend, "forward", crash)
    with pytest.warns(RuntimeWarning, match="no kernel image"):
        assert not self_check.passes_self_check("cpp", "cpu", FLOAT)


def test_the_check_can_be_switched_off(checked_cpu, broken_cpp, monkeypatch):
    monkeypatch.setenv("RDN_KERNELS_SELF_CHECK", "0")
    assert backends.resolve_backend("auto", CPU, FLOAT, verify=self_check.passes_self_check) == "cpp"


def test_under_torch_compile_the_verdict_is_a_constant(checked_cpu, broken_cpp):
    x, w = torch.randn(2, 6, 4, 4), torch.randn(6, 6, 1, 1)

    def block(x):
        return torch.relu(nested_conv2d(x, w, in_splits=(3, 3), out_splits=(3, 3)))

    with pytest.warns(RuntimeWarning, match="failed its self-check"):
        compiled = torch.compile(block, fullgraph=True)(x)
    expected = torch.relu(nested_conv2d(x, w, in_splits=(3, 3), out_splits=(3, 3), backend="torch"))
    torch.testing.assert_close(compiled, expected)  # the broken backend was not compiled in


def test_the_verdict_is_marked_as_torch_marks_constant_results():
    def probe():
        return True

    torch.compiler.assume_constant_result(probe)
    marks = {name for name in vars(probe) if name.startswith("_dynamo")}
    assert marks and all(getattr(self_check.passes_self_check, name, None) for name in marks)


def test_cpu_is_not_self_checked_in_production():
    assert "cpu" not in backends.SELF_CHECKED_DEVICE_TYPES and "cuda" in backends.SELF_CHECKED_DEVICE_TYPES


def test_the_check_runs_in_the_dtype_asked_for_even_under_autocast(checked_cpu):
    """The first call may come under torch.autocast (the GPU training loop's default): the check must
    run the backend in the dtype it judges, not in autocast's, or a healthy backend would fail."""
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert self_check.passes_self_check("cpp", "cpu", FLOAT)
