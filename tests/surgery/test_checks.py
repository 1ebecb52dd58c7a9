"""The nesting check of checks.py fails for the bugs it names (a check that cannot fail checks nothing)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdn.nn import NestedConv2d
from rdn.surgery import RussianDollNet
from tests.surgery import checks
from tests.surgery.checks import assert_earlier_subnets_ignore_later_groups
from tests.surgery.test_nest import nested_toy


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(1))


class _MaskIgnoringConv(NestedConv2d):
    """Planted bug: a dense conv over every input group < hi, its block mask ignored, so earlier output
    groups read later input groups through the blocks above the diagonal (whenever they are not zero)."""

    def forward(self, x: Tensor, stages: tuple[int, int] | None = None, out: Tensor | None = None) -> Tensor:
        lo, hi = stages or (0, self.num_groups)
        rows = slice(self.layout.out_offsets[lo], self.layout.out_offsets[hi])
        columns = self.layout.in_offsets[hi]
        bias = None if self.bias is None else self.bias[rows]
        y = F.conv2d(x[:, :columns], self.weight[rows, :columns], bias, self.stride, self.padding, self.dilation)
        if out is None:
            return y
        out[:, rows] = y
        return out


class _LeakyNorm(nn.BatchNorm2d):
    """Planted bug: every channel is shifted by the running mean of the last channel it is given."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + self.running_mean[-1]


def _first_layer(net: RussianDollNet, kind: type[nn.Module]) -> str:
    """A layer of type ``kind`` whose input and output have later groups (a nested layer reading a
    nested tensor: earlier rows could read later input groups)."""
    for name, space in net.layer_spaces().items():
        layer = net.layers[name]
        if isinstance(layer, kind) and not space.is_single_group:
            if not isinstance(layer, NestedConv2d) or sum(layer.in_splits[1:]):
                return name
    raise AssertionError(f"no {kind.__name__} with later groups in the toy")


def test_an_early_group_reading_a_later_one_is_caught(images):
    """Only the one-pass forward computes a layer's early rows from an input that holds the later
    groups: the check must look there (N_s alone never gives its layers those groups)."""
    net = nested_toy(exact=False)  # passes the check (test_nest, test_copy_fraction, test_compensate)
    net.layers[_first_layer(net, NestedConv2d)].__class__ = _MaskIgnoringConv
    with torch.no_grad():  # with the blocks above the diagonal zero, as surgery leaves them, it computes the same
        torch.testing.assert_close(net(images, subnet=net.num_subnets), nested_toy(exact=False)(images)[-1])
    with pytest.raises(AssertionError, match="through the one pass path changed"):
        assert_earlier_subnets_ignore_later_groups(net, images)


def test_a_channel_reading_a_later_groups_buffer_is_caught(images):
    net = nested_toy(exact=False)
    net.layers[_first_layer(net, nn.BatchNorm2d)].__class__ = _LeakyNorm
    with pytest.raises(AssertionError, match="were perturbed: an earlier sub-network reads a later group"):
        assert_earlier_subnets_ignore_later_groups(net, images)


def test_a_perturbation_that_misses_the_layers_is_caught(images, monkeypatch):
    """The check asserts that its perturbation changes N_K: one that touches nothing proves nothing."""

    def touch_nothing(rdn: RussianDollNet, s: int, generator: torch.Generator) -> int:
        return sum(len(space) - space.offsets[s] for space in rdn.layer_spaces().values())

    monkeypatch.setattr(checks, "perturb_later_layers", touch_nothing)
    with pytest.raises(AssertionError, match="did not change N_K's logits"):
        assert_earlier_subnets_ignore_later_groups(nested_toy(exact=False), images)
