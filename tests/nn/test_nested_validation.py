"""Bad input to NestedConv2d / NestedLinear: a clear error naming the argument, never a broken module.

Also: a refused ``load_state_dict`` leaves the layer as it was.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rdn.nn import NestedConv2d, NestedLinear

DTYPE = torch.float64


@pytest.mark.parametrize(
    "geometry, error, match",
    [
        ({"kernel_size": 0}, ValueError, r"kernel_size must be >= 1 in each dimension, got \(0, 0\)"),
        ({"kernel_size": (3, 0)}, ValueError, r"kernel_size must be >= 1 in each dimension, got \(3, 0\)"),
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
