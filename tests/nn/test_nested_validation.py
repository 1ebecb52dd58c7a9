"""Bad input to NestedConv2d / NestedLinear: a clear error naming the argument, never a broken module.

Also: a refused ``load_state_dict`` leaves the layer as it was, and ``torch.jit.trace`` works
(``torch.jit.script`` is refused with a message that says what to do instead).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from rdn.nn import NestedConv2d, NestedLinear
from tests.utils import assert_close, nan_filled_like

DTYPE = torch.float64


@pytest.mark.parametrize(
    "geometry, error, match",
    [
        ({"kernel_size": 0}, ValueError, r"kernel_size must be >= 1, got \(0, 0\)"),
        ({"kernel_size": (3, 0)}, ValueError, r"kernel_size must be >= 1, got \(3, 0\)"),
        ({"kernel_size": -1}, ValueError, "kernel_size must be >= 1"),
        ({"kernel_size": 1.5}, TypeError, "kernel_size must be an int or a pair of ints"),
        ({"kernel_size": True}, TypeError, "kernel_size must be an int or a pair of ints"),
        ({"kernel_size": (3, 3, 3)}, TypeError, "kernel_size must be an int or a pair of ints"),
        ({"kernel_size": "3"}, TypeError, "kernel_size must be an int or a pair of ints"),
        ({"kernel_size": 3, "stride": 0}, ValueError, "stride must be >= 1"),
        ({"kernel_size": 3, "stride": (1, 0)}, ValueError, "stride must be >= 1"),
        ({"kernel_size": 3, "stride": 1.0}, TypeError, "stride must be an int or a pair of ints"),
        ({"kernel_size": 3, "padding": -1}, ValueError, "padding must be >= 0"),
        ({"kernel_size": 3, "padding": (1, 1, 1)}, TypeError, "padding must be an int or a pair of ints"),
        ({"kernel_size": 3, "dilation": 0}, ValueError, "dilation must be >= 1"),
    ],
)
def test_conv_constructor_rejects_bad_geometry(geometry, error, match):
    with pytest.raises(error, match=match):
        NestedConv2d((2, 2), (2, 2), **geometry)


def test_valid_geometry_is_normalised_to_pairs():
    module = NestedConv2d((2, 2), (2, 2), [3, 1], stride=(2, 1), padding=[1, 0], dilation=2)
    assert (module.kernel_size, module.stride, module.padding, module.dilation) == ((3, 1), (2, 1), (1, 0), (2, 2))
    assert module.weight.shape == (4, 4, 3, 1)


@pytest.mark.parametrize("cls", [NestedConv2d, NestedLinear])
@pytest.mark.parametrize(
    "in_splits, out_splits, match",
    [
        ((0, 0), (0, 0), "in_splits must have a positive sum"),
        ((2, 2), (0, 0), "out_splits must have a positive sum"),
        ((0, 0), (2, 2), "in_splits must have a positive sum"),
        ((0,), (3,), "in_splits must have a positive sum"),
    ],
)
def test_zero_channel_layers_are_refused(cls, in_splits, out_splits, match):
    # nn.Conv2d builds with 0 channels but cannot run (0 outputs) or returns an empty output (0
    # inputs): a layer without channels is refused when it is built, not on first use.
    geometry = {"kernel_size": 3} if cls is NestedConv2d else {}
    with pytest.raises(ValueError, match=match):
        cls(in_splits, out_splits, **geometry)


@pytest.mark.parametrize("cls", [NestedConv2d, NestedLinear])
def test_constructor_rejects_non_floating_dtype_and_non_bool_bias(cls):
    geometry = {"kernel_size": 1} if cls is NestedConv2d else {}
    for dtype in (torch.int64, torch.complex64, "float32"):
        with pytest.raises(TypeError, match="dtype must be a floating point torch.dtype"):
            cls((2, 2), (2, 2), dtype=dtype, **geometry)
    with pytest.raises(TypeError, match="bias must be a bool"):
        cls((2, 2), (2, 2), bias=torch.ones(4), **geometry)
    assert cls((2, 2), (2, 2), dtype=torch.float16, **geometry).weight.dtype == torch.float16


def test_from_conv_and_from_linear_check_their_arguments_first():
    with pytest.raises(TypeError, match="in_splits must be a sequence"):
        NestedConv2d.from_conv(nn.Conv2d(4, 4, 3), 4, (2, 2))
    with pytest.raises(TypeError, match="out_splits must be a sequence"):
        NestedLinear.from_linear(nn.Linear(4, 4), (2, 2), None)
    with pytest.raises(ValueError, match="uninitialized lazy"):
        NestedConv2d.from_conv(nn.LazyConv2d(4, 3), (2, 2), (2, 2))
    with pytest.raises(ValueError, match="uninitialized lazy"):
        NestedLinear.from_linear(nn.LazyLinear(4), (2, 2), (2, 2))


def test_from_parameters_checks_the_tensors():
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        NestedConv2d.from_parameters([[1.0]], None, (1,), (1,), kernel_size=1)
    with pytest.raises(TypeError, match="weight must have a floating dtype"):
        NestedLinear.from_parameters(torch.ones(2, 2, dtype=torch.long), None, (1, 1), (1, 1))
    with pytest.raises(TypeError, match="bias must be a torch.Tensor or None"):
        NestedLinear.from_parameters(torch.ones(2, 2), [1.0, 2.0], (1, 1), (1, 1))


# ------------------------------------------------------------------------------------------------
# load_state_dict
# ------------------------------------------------------------------------------------------------


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


@pytest.mark.parametrize(
    "bad_mask, error",
    [
        (torch.ones(3, 3, dtype=torch.bool), ValueError),  # not lower-triangular
        (torch.ones(2, 2, dtype=torch.bool).tril(), ValueError),  # K=2 mask for a K=3 layer
        (torch.ones(3, 3, dtype=torch.int64).tril(), TypeError),  # not bool
        (torch.ones(3, 3, dtype=torch.uint8).tril(), TypeError),
        ([[1, 0, 0], [1, 1, 0], [1, 1, 1]], TypeError),  # not a tensor
    ],
)
@pytest.mark.parametrize("cls", ["conv", "linear"])
def test_refused_mask_leaves_the_layer_unchanged(cls, bad_mask, error):
    torch.manual_seed(0)
    if cls == "conv":
        make = lambda: NestedConv2d((2, 3, 2), (3, 2, 4), 3, padding=1, dtype=DTYPE)  # noqa: E731
        x = torch.randn(2, 7, 5, 5, dtype=DTYPE)
    else:
        make = lambda: NestedLinear((2, 3, 2), (3, 2, 4), dtype=DTYPE)  # noqa: E731
        x = torch.randn(2, 7, dtype=DTYPE)
    target = make()
    target.set_block_mask([[1, 0, 0], [0, 1, 0], [1, 0, 1]])
    before, layout, y = _snapshot(target), target.layout, target(x)
    state = make().state_dict()  # other weights, so a partial copy would show
    state["block_mask"] = bad_mask
    with pytest.raises(error, match="block_mask"):
        target.load_state_dict(state)
    after = target.state_dict()
    assert set(after) == set(before)
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed by a refused load"
    assert target.layout == layout
    assert torch.equal(target(x), y)
    target.load_state_dict(target.state_dict())  # its own state still loads


def test_refused_mask_inside_a_model_names_the_key():
    model = nn.Sequential(nn.Identity(), NestedLinear((2, 2), (2, 2)))
    state = model.state_dict()
    state["1.block_mask"] = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"'1\.block_mask'.*lower-triangular"):
        model.load_state_dict(state)


def test_size_mismatch_is_torchs_error_and_the_mask_stays_consistent():
    torch.manual_seed(0)
    target = NestedLinear((2, 2), (2, 2), dtype=DTYPE)
    state = NestedLinear((2, 2), (2, 2), dtype=DTYPE).state_dict()
    state["block_mask"] = torch.tensor([[True, False], [False, True]])
    state["weight"] = torch.zeros(4, 5, dtype=DTYPE)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        target.load_state_dict(state)
    # torch copies the entries that fit (here the mask): the Python copy must follow the buffer.
    assert target.layout.mask == tuple(tuple(row) for row in target.block_mask.tolist())
    target.load_state_dict(target.state_dict())


def test_load_with_assign_updates_the_layout():
    source = NestedConv2d((2, 2), (2, 2), 1, block_mask=[[1, 0], [0, 1]], dtype=DTYPE)
    target = NestedConv2d((2, 2), (2, 2), 1, dtype=DTYPE)
    target.load_state_dict(source.state_dict(), assign=True)
    assert target.layout.mask == ((True, False), (False, True))
    x = torch.randn(1, 4, 3, 3, dtype=DTYPE)
    assert torch.equal(target(x), source(x))


# ------------------------------------------------------------------------------------------------
# TorchScript
# ------------------------------------------------------------------------------------------------


class _StagedNet(nn.Module):
    """Full, staged, prefix-input and ``out=`` calls of both nested layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = NestedConv2d((2, 3, 2), (3, 2, 4), 3, padding=1, block_mask=[[1, 0, 0], [0, 1, 0], [1, 1, 1]])
        self.fc = NestedLinear((3, 2, 4), (2, 2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        full = self.conv(x)
        first = self.conv(x[:, :2], stages=(0, 1))
        middle = self.conv(x, stages=(1, 2))
        buffer = torch.zeros_like(full)
        written = self.conv(x, stages=(1, 3), out=buffer)
        features = full.mean(dim=(2, 3))
        logits = self.fc(features)
        head = self.fc(features[:, :5], stages=(0, 2))
        return full, first, middle, written, logits, head


def _trace(model: nn.Module, *inputs: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, inputs)
    tracer_warnings = [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    assert not tracer_warnings, tracer_warnings
    return traced


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_trace_equals_eager_on_new_inputs_and_uses_stock_ops():
    torch.manual_seed(0)
    model = _StagedNet().double()
    traced = _trace(model, torch.randn(2, 7, 6, 6, dtype=DTYPE))
    x = torch.randn(3, 7, 5, 5, dtype=DTYPE)  # another batch and spatial size
    for index, (got, want) in enumerate(zip(traced(x), model(x), strict=True)):
        assert_close(got, want, what=f"output {index}")
    # Stock ops only: the trace runs where the rdn:: ops are not registered (C++, other processes).
    assert "rdn::" not in str(traced.inlined_graph)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_traced_layer_trains_like_the_eager_one():
    torch.manual_seed(0)
    module = NestedConv2d((2, 2), (3, 3), 3, padding=1, dtype=DTYPE)
    x = torch.randn(2, 4, 5, 5, dtype=DTYPE)
    traced = _trace(module, x)
    grad_traced = torch.autograd.grad(traced(x).square().sum(), module.weight)[0]
    grad_eager = torch.autograd.grad(module(x).square().sum(), module.weight)[0]
    assert_close(grad_traced, grad_eager, what="weight grad")
    assert (grad_traced[~module.weight_mask()] == 0).all()


class _Call(nn.Module):
    """``layer(x, stages=stages)``, with ``out=`` a NaN buffer of ``out_channels`` when given."""

    def __init__(self, layer: nn.Module, stages=None, out_channels: int | None = None) -> None:
        super().__init__()
        self.layer, self.stages, self.out_channels = layer, stages, out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None if self.out_channels is None else nan_filled_like(x[:, :1]).repeat(1, self.out_channels, 1, 1)
        return self.layer(x, stages=self.stages, out=out)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_traced_forward_checks_its_arguments():
    module = NestedConv2d((2, 3), (2, 2), 1)
    x = torch.randn(1, 5, 2, 2)
    for stages, error in (((1, 1), ValueError), ((0, 3), ValueError), ((0,), TypeError), ((0, True), TypeError)):
        with pytest.raises(error, match="stages"):
            torch.jit.trace(_Call(module, stages), x)
    # 4 channels is neither C=5 nor the prefix 2 read by stages (0, 1).
    with pytest.raises(ValueError, match=r"input must be 4-D with C = 5 channels or the prefix 2 .*\(1, 4, 2, 2\)"):
        torch.jit.trace(_Call(module, (0, 1)), x[:, :4])
    with pytest.raises(ValueError, match=r"input must be 4-D with C = 5 channels, got shape \(1, 5, 2\)"):
        torch.jit.trace(_Call(module), x[:, :, 0])
    with pytest.raises(ValueError, match=r"out must have the full output shape \(1, 4, 2, 2\), got \(1, 3, 2, 2\)"):
        torch.jit.trace(_Call(module, out_channels=3), x)
    traced = torch.jit.trace(_Call(module, (1, 2), out_channels=4), x)
    with torch.no_grad():
        assert_close(traced(x)[:, 2:], module(x)[:, 2:], what="traced out=")
        assert traced(x)[:, :2].isnan().all()


@pytest.mark.parametrize("module", [NestedConv2d((2, 2), (2, 2), 1), NestedLinear((2, 2), (2, 2))])
def test_script_is_refused_with_the_alternatives(module):
    for target in (module, nn.Sequential(nn.Identity(), module)):
        with pytest.raises(TypeError, match=r"torch\.jit\.script.*torch\.jit\.trace.*export_"):
            torch.jit.script(target)
