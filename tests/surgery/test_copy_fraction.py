"""``nest(..., copy_fraction=f)``: only a share of every group's channels get copies in the added groups."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rdn.surgery import RussianDollNet
from rdn.surgery.select import invisible_energy
from tests.surgery.checks import assert_earlier_subnets_ignore_later_groups, assert_paths_agree
from tests.surgery.test_nest import nested_toy
from tests.surgery.toys import toy

K_PRIMARY = 3  # nested_toy's k


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 10, 10, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fraction", [0.0, 0.5])
@pytest.mark.parametrize("select", ["greedy", "random"])
def test_fewer_copies_fewer_channels_and_the_properties_hold(images, fraction, select):
    full, partial = nested_toy(exact=False, select=select), nested_toy(exact=False, select=select,
                                                                       copy_fraction=fraction)  # fmt: skip
    truncated = nested_toy(mode="truncate", select=select)
    assert partial.rdn_config["copy_fraction"] == fraction
    for name, step in partial._by_name.items():
        if step.space is None or step.space.is_single_group or step.role != "nested":
            continue
        space, full_space = step.space, full._by_name[name].space
        primaries = space.primary_sizes
        for g in range(K_PRIMARY - 1):  # the added group k + g holds copies of round(f · size) units
            added = space.splits[K_PRIMARY + g]
            assert added == (round(fraction * primaries[g]) * space.unit if full_space.splits[K_PRIMARY + g] else 0)
        assert space.splits[:K_PRIMARY] == full_space.splits[:K_PRIMARY]
    macs = [net.macs(net.num_subnets) for net in (truncated, partial, full)]
    assert macs[0] <= macs[1] <= macs[2] and (fraction == 0 or macs[1] < macs[2])
    assert_paths_agree(partial, images, export=True)


def test_later_groups_never_change_earlier_subnets(images):
    net = nested_toy(exact=False, copy_fraction=0.5)
    assert_earlier_subnets_ignore_later_groups(net, images)


def test_greedy_copies_the_units_that_lose_the_most(images):
    """Within a primary group, the units with copies lose at least as much energy as those without."""
    calib = torch.randn(8, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    base = toy(nn.ReLU)
    net = nested_toy(exact=False, copy_fraction=0.5, calib=calib)
    layout, order = next(iter(net.rdn_config["orders"].items()))
    step = net._by_name[layout]
    space = step.space
    layer = dict(base.named_modules())[step.node.target]
    captured = []
    handle = layer.register_forward_hook(lambda module, args, output: captured.append(args[0]))
    with torch.no_grad():
        base.eval()(calib)
    handle.remove()
    in_space = net._by_name[step.inputs[0]].space
    groups = (torch.zeros(in_space.channels, dtype=torch.long) if in_space is None or in_space.is_single_group
              else in_space.primary_group_of_channel)  # fmt: skip
    start = 0
    for g, size in enumerate(space.primary_sizes[:-1]):
        energy = invisible_energy(layer, captured[0], groups > g).view(-1, space.unit).sum(1)
        units = order[start : start + size]
        copied = space.copied[g]
        if 0 < copied < size and energy[units].max() > 0:
            assert energy[units[:copied]].min() >= energy[units[copied:]].max()
        start += size


def test_config_round_trip(images):
    net = nested_toy(exact=False, copy_fraction=0.5, select="random", seed=3)
    rebuilt = RussianDollNet.from_config(json.loads(json.dumps(net.rdn_config)), model=toy(nn.ReLU, seed=11))
    rebuilt.load_state_dict(net.state_dict())
    with torch.no_grad():
        for a, b in zip(rebuilt.eval()(images), net(images), strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(copy_fraction=1.5, exact=False), ValueError, r"must be in \[0, 1\]"),
        (dict(copy_fraction="half", exact=False), TypeError, "must be a number"),
        (dict(copy_fraction=0.5), ValueError, "exact=False"),
        (dict(copy_fraction=0.5, exact=False, mode="truncate"), ValueError, "mode='expand'"),
    ],
)
def test_bad_copy_fractions(kwargs, error, match):
    with pytest.raises(error, match=match):
        nested_toy(**kwargs)
