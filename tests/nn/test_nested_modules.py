"""NestedConv2d / NestedLinear against masked dense torch layers, plus export, state and training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rdn.nn import NestedConv2d, NestedLinear, split_channels
from rdn_kernels import available_backends
from tests.utils import assert_close, nan_filled_like

DTYPE = torch.float64


def dense_mask(in_splits, out_splits, block_mask=None) -> torch.Tensor:
    """(D, C) bool built block by block, independently of the module's own helper."""
    k = len(in_splits)
    rows = []
    for j in range(k):
        row = [
            torch.full((out_splits[j], in_splits[i]), bool(block_mask[j][i]) if block_mask is not None else i <= j)
            for i in range(k)
        ]
        rows.append(torch.cat(row, dim=1))
    return torch.cat(rows, dim=0)


def masked_conv_reference(module: NestedConv2d, x: torch.Tensor, block_mask=None) -> torch.Tensor:
    mask = dense_mask(module.in_splits, module.out_splits, block_mask)[:, :, None, None]
    return F.conv2d(x, module.weight * mask, module.bias, module.stride, module.padding, module.dilation)


CONV_CASES = [
    # in_splits, out_splits, kernel, stride, padding, dilation, block_mask
    ((3, 2, 4), (2, 5, 1), 3, 1, 1, 1, None),
    ((5, 0, 2), (3, 3, 0), 3, 2, 1, 1, None),
    ((4, 4), (7, 6), 1, 1, 0, 1, None),
    ((2, 3, 2), (3, 2, 4), (3, 1), (2, 1), (1, 0), 2, [[1, 0, 0], [0, 1, 0], [1, 0, 1]]),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_forward_and_backward_match_masked_dense(case):
    in_splits, out_splits, kernel, stride, padding, dilation, block_mask = case
    torch.manual_seed(0)
    module = NestedConv2d(in_splits, out_splits, kernel, stride, padding, dilation, block_mask=block_mask, dtype=DTYPE)
    x = torch.randn(2, sum(in_splits), 9, 7, dtype=DTYPE, requires_grad=True)
    y = module(x)
    expected = masked_conv_reference(module, x, block_mask)
    assert_close(y, expected, what="output")

    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, module.weight, module.bias), grad)
    want = torch.autograd.grad(expected, (x, module.weight, module.bias), grad)
    for name, g, w in zip(("input", "weight", "bias"), got, want, strict=True):
        assert_close(g, w, what=f"grad {name}")


def test_init_zeroes_unused_blocks_and_matches_conv_init_range():
    torch.manual_seed(0)
    module = NestedConv2d((8, 8, 8), (16, 16, 16), 3, padding=1)
    mask = dense_mask(module.in_splits, module.out_splits)
    weight = module.weight.detach()
    assert torch.equal(module.weight_mask(), mask)
    assert (weight[~mask] == 0).all() and not torch.signbit(weight[~mask]).any()
    assert (weight[mask] != 0).all()
    # nn.Conv2d's kaiming-uniform(a=sqrt(5)) bound on the dense fan-in C·kh·kw.
    bound = 1 / math.sqrt(24 * 9)
    assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound
    assert module.bias.abs().max() <= bound
    assert module.num_groups == 3 and module.block_mask.dtype == torch.bool


def test_from_conv_copies_parameters_and_geometry():
    torch.manual_seed(0)
    conv = nn.Conv2d(7, 9, 3, stride=2, padding=1, dilation=1, dtype=DTYPE)
    in_splits, out_splits = split_channels(7, 3), split_channels(9, 3)
    nested = NestedConv2d.from_conv(conv, in_splits, out_splits)
    x = torch.randn(2, 7, 11, 10, dtype=DTYPE)
    mask = dense_mask(in_splits, out_splits)[:, :, None, None]
    expected = F.conv2d(x, conv.weight * mask, conv.bias, 2, 1)
    assert_close(nested(x), expected, what="from_conv")
    assert nested.weight.data_ptr() != conv.weight.data_ptr()
    assert torch.equal(nested.bias, conv.bias)
    assert (nested.stride, nested.padding, nested.weight.dtype) == ((2, 2), (1, 1), DTYPE)


def test_from_conv_with_one_group_reproduces_the_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding="same", bias=False, dtype=DTYPE)
    nested = NestedConv2d.from_conv(conv, (6,), (5,))
    x = torch.randn(2, 6, 8, 8, dtype=DTYPE)
    assert nested.padding == (1, 1) and nested.bias is None
    assert_close(nested(x), conv(x), what="K=1")


def test_from_conv_valid_padding_string():
    conv = nn.Conv2d(4, 4, 3, padding="valid")
    assert NestedConv2d.from_conv(conv, (2, 2), (2, 2)).padding == (0, 0)


@pytest.mark.parametrize(
    "conv, in_splits, out_splits, error, match",
    [
        (nn.Conv2d(8, 8, 3, groups=2), (4, 4), (4, 4), ValueError, "groups=2"),
        (nn.Conv2d(8, 8, 3, groups=8), (4, 4), (4, 4), ValueError, "groups=8"),
        (nn.Conv2d(8, 8, 4, padding="same"), (4, 4), (4, 4), ValueError, "asymmetrically"),
        (nn.Conv2d(8, 8, 3, padding_mode="reflect"), (4, 4), (4, 4), ValueError, "padding_mode"),
        (nn.Conv2d(8, 6, 3), (4, 3), (3, 3), ValueError, "in_splits must sum"),
        (nn.Conv2d(8, 6, 3), (4, 4), (3, 2), ValueError, "out_splits must sum"),
        (nn.Conv2d(8, 6, 3), (4, 4), (3, 2, 1), ValueError, "same number of groups"),
        (nn.Linear(8, 6), (4, 4), (3, 3), TypeError, "nn.Conv2d"),
    ],
)
def test_from_conv_rejects_bad_input(conv, in_splits, out_splits, error, match):
    with pytest.raises(error, match=match):
        NestedConv2d.from_conv(conv, in_splits, out_splits)


def test_constructor_rejects_bad_structure():
    with pytest.raises(ValueError, match="lower-triangular"):
        NestedConv2d((2, 2), (2, 2), 1, block_mask=[[1, 1], [1, 1]])
    with pytest.raises(ValueError, match="non-negative"):
        NestedConv2d((2, -1), (2, 2), 1)
    with pytest.raises(ValueError, match="padding"):
        NestedConv2d((2, 2), (2, 2), 3, padding="same")
    with pytest.raises(ValueError, match="backend"):
        NestedLinear((2, 2), (2, 2), backend="fast")
    with pytest.raises(ValueError, match="channels"):
        NestedConv2d((2, 2), (2, 2), 1)(torch.randn(1, 3, 4, 4))


def test_stages_and_out_buffer():
    torch.manual_seed(0)
    module = NestedConv2d((3, 2, 4), (2, 5, 3), 3, padding=1, dtype=DTYPE)
    x = torch.randn(2, 9, 6, 6, dtype=DTYPE)
    full = module(x)
    assert_close(module(x, stages=(1, 3)), full[:, 2:], what="stages (1, 3)")
    # Stage (0, 2) reads only the first two input groups: a prefix input is enough.
    assert_close(module(x[:, :5], stages=(0, 2)), full[:, :7], what="prefix input")
    out = nan_filled_like(full)
    returned = module(x, stages=(1, 2), out=out)
    assert returned is out
    assert_close(out[:, 2:7], full[:, 2:7], what="out slice")
    assert out[:, :2].isnan().all() and out[:, 7:].isnan().all()


@pytest.mark.parametrize("block_mask", [None, [[1, 0, 0], [0, 1, 0], [1, 1, 1]]])
def test_export_conv_equals_first_groups(block_mask):
    torch.manual_seed(0)
    module = NestedConv2d((3, 2, 4), (2, 5, 3), 3, stride=2, padding=1, block_mask=block_mask, dtype=DTYPE)
    x = torch.randn(2, 9, 7, 7, dtype=DTYPE)
    full = module(x)
    for s, (channels_in, channels_out) in enumerate([(3, 2), (5, 7), (9, 10)], start=1):
        plain = module.export_conv(s)
        assert type(plain) is nn.Conv2d
        assert (plain.in_channels, plain.out_channels) == (channels_in, channels_out)
        assert_close(plain(x[:, :channels_in]), full[:, :channels_out], what=f"export s={s}")
    with pytest.raises(ValueError, match="1 <= s <= K=3"):
        module.export_conv(0)


def test_state_dict_round_trip_carries_the_mask():
    torch.manual_seed(0)
    mask = [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    source = NestedConv2d((2, 3, 2), (3, 2, 4), 3, padding=1, block_mask=mask, dtype=DTYPE)
    state = source.state_dict()
    assert set(state) == {"weight", "bias", "block_mask"}
    target = NestedConv2d((2, 3, 2), (3, 2, 4), 3, padding=1, dtype=DTYPE)
    target.load_state_dict(state)
    assert target.layout.mask == source.layout.mask
    x = torch.randn(2, 7, 5, 5, dtype=DTYPE)
    assert torch.equal(target(x), source(x))
    assert "block_mask=[[1, 0, 0], [0, 1, 0], [1, 0, 1]]" in repr(target)

    state["block_mask"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="lower-triangular"):
        target.load_state_dict(state)


@pytest.mark.parametrize("cls", ["conv", "linear"])
def test_set_block_mask_drops_blocks_and_zeroes_their_weights(cls):
    torch.manual_seed(0)
    splits = (2, 3, 2)
    if cls == "conv":
        module = NestedConv2d(splits, splits, 3, padding=1, dtype=DTYPE)
        x = torch.randn(2, 7, 5, 5, dtype=DTYPE)
    else:
        module = NestedLinear(splits, splits, dtype=DTYPE)
        x = torch.randn(4, 7, dtype=DTYPE)
    mask = [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    module.set_block_mask(mask)
    assert module.layout.mask == tuple(tuple(bool(v) for v in row) for row in mask)
    assert module.block_mask.tolist() == [[bool(v) for v in row] for row in mask]
    used = dense_mask(splits, splits, mask)
    assert torch.all(module.weight[~used] == 0) and torch.all(module.weight[used] != 0)
    expected = masked_conv_reference(module, x, mask) if cls == "conv" else F.linear(x, module.weight, module.bias)
    assert_close(module(x), expected, what="after set_block_mask")
    with pytest.raises(ValueError, match="lower-triangular"):
        module.set_block_mask([[1, 1, 0], [1, 1, 0], [1, 1, 1]])


def test_backend_attribute_is_honoured():
    if "cpp" not in available_backends("cpu"):
        pytest.skip("the C++ extension is not built (make build)")
    torch.manual_seed(0)
    module = NestedConv2d((3, 5), (4, 4), 3, padding=1)
    x = torch.randn(2, 8, 6, 6)
    module.backend = "torch"
    reference = module(x)
    module.backend = "cpp"
    assert_close(module(x), reference, what="cpp vs torch")
    assert "backend='cpp'" in repr(module)
    # The attribute reaches the op: cpp has no float16 kernels, the reference has.
    half = module.to(torch.float16)
    with pytest.raises(TypeError, match="cpp"):
        half(x.half())
    half.backend = "torch"
    assert half(x.half()).dtype == torch.float16


def test_unused_blocks_stay_zero_under_sgd_with_momentum_and_weight_decay():
    torch.manual_seed(0)
    conv = NestedConv2d((3, 3, 2), (4, 2, 4), 3, padding=1)
    linear = NestedLinear((4, 2, 4), (3, 3, 3))
    unused = [~conv.weight_mask(), ~linear.weight_mask()]
    before = [conv.weight.detach().clone(), linear.weight.detach().clone()]
    optimizer = torch.optim.SGD([*conv.parameters(), *linear.parameters()], lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(3):
        x = torch.randn(4, 8, 5, 5)
        loss = linear(conv(x).mean(dim=(2, 3))).square().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for parameter, start, mask in zip((conv.weight, linear.weight), before, unused, strict=True):
        assert (parameter.detach()[mask] == 0).all()
        assert not torch.equal(parameter.detach()[~mask], start[~mask])


def test_linear_matches_masked_dense_and_exports():
    torch.manual_seed(0)
    in_splits, out_splits = (3, 0, 4), (2, 3, 2)
    module = NestedLinear(in_splits, out_splits, dtype=DTYPE)
    x = torch.randn(5, 7, dtype=DTYPE)
    expected = F.linear(x, module.weight * dense_mask(in_splits, out_splits), module.bias)
    full = module(x)
    assert_close(full, expected, what="linear")
    assert_close(module(x[:, :3], stages=(1, 2)), full[:, 2:5], what="linear stages")
    out = nan_filled_like(full)
    module(x, stages=(2, 3), out=out)
    assert_close(out[:, 5:], full[:, 5:], what="linear out")
    assert out[:, :5].isnan().all()
    plain = module.export_linear(2)
    assert type(plain) is nn.Linear and (plain.in_features, plain.out_features) == (3, 5)
    assert_close(plain(x[:, :3]), full[:, :5], what="export_linear")
    assert "in_splits=(3, 0, 4)" in repr(module)


def test_from_linear():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4, bias=False, dtype=DTYPE)
    nested = NestedLinear.from_linear(linear, (3, 3), (2, 2))
    x = torch.randn(3, 6, dtype=DTYPE)
    expected = F.linear(x, linear.weight * dense_mask((3, 3), (2, 2)))
    assert nested.bias is None
    assert_close(nested(x), expected, what="from_linear")
    with pytest.raises(ValueError, match="in_splits must sum"):
        NestedLinear.from_linear(linear, (3, 2), (2, 2))
    with pytest.raises(TypeError, match="nn.Linear"):
        NestedLinear.from_linear(nn.Conv2d(6, 4, 1), (3, 3), (2, 2))


def test_from_parameters_masks_and_checks_shapes():
    torch.manual_seed(0)
    weight, bias = torch.randn(4, 6, 3, 3, dtype=DTYPE), torch.randn(4, dtype=DTYPE)
    geometry = {"kernel_size": 3, "stride": 2, "padding": 1, "dilation": 1}
    nested = NestedConv2d.from_parameters(weight, bias, (3, 3), (2, 2), **geometry)
    assert (nested.stride, nested.padding) == ((2, 2), (1, 1))
    assert torch.equal(nested.weight, weight * dense_mask((3, 3), (2, 2))[:, :, None, None])
    assert torch.equal(nested.bias, bias)
    with pytest.raises(ValueError, match=r"weight must have shape \(4, 6, 3, 3\)"):
        NestedConv2d.from_parameters(weight[:, :5], bias, (3, 3), (2, 2), **geometry)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        NestedLinear.from_parameters(weight[:, :, 0, 0], bias[:3], (3, 3), (2, 2))


def test_split_channels_rule():
    assert split_channels(10, 4) == (3, 3, 2, 2)
    assert split_channels(8, 4) == (2, 2, 2, 2)
    assert split_channels(5, 5) == (1,) * 5
    assert split_channels(7, 1) == (7,)
    with pytest.raises(ValueError, match="k must satisfy"):
        split_channels(3, 4)
    with pytest.raises(ValueError, match="k must satisfy"):
        split_channels(3, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        split_channels(3, 1.5)


class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = NestedConv2d((2, 2), (4, 4), 3, padding=1)
        self.conv2 = NestedConv2d((4, 4), (3, 3), 1)
        self.fc = NestedLinear((3, 3), (2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv2(torch.relu(self.conv1(x))).mean(dim=(2, 3)))


def test_torch_compile_matches_eager():
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available in this torch build")
    torch.manual_seed(0)
    model = _TinyNet()
    x = torch.randn(2, 4, 6, 6)
    # aot_eager traces through dynamo, fake tensors and autograd without a C++ compile step.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert_close(compiled(x), model(x), what="compiled forward")
    x_grad = x.clone().requires_grad_()
    compiled(x_grad).sum().backward()
    eager_grad = torch.autograd.grad(model(x.clone().requires_grad_()).sum(), model.conv1.weight)[0]
    assert_close(model.conv1.weight.grad, eager_grad, what="compiled grad")
