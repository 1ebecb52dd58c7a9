"""``nest(..., copy_fraction=f)``: only a share of every group's channels get copies in the added groups."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rdn.surgery import RussianDollNet
from tests.surgery.checks import assert_earlier_subnets_ignore_later_groups, assert_paths_agree, lost_energy
from tests.surgery.test_nest import nested_toy
from tests.surgery.toys import toy

K_PRIMARY = 3  # nested_toy's k


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 10, 10, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fraction", [0.0, 0.5])
@pytest.mark.parametrize("select", ["greedy", "random"])
def test_fewer_copies_fewer_channels_and_the_properties_hold(images, fraction, select):
    full, partial = nested_toy(exact=False, mac_budget=None, select=select), nested_toy(exact=False, select=select,
                                                                       copy_fraction=fraction)  # fmt: skip
    truncated = nested_toy(mode="truncate", select=select)
    assert partial.rdn_config["copy_fraction"] == fraction
    for name, layer in partial.nested_layers().items():
        _, space = partial.nested_spaces(name)
        splits, full_splits = layer.out_splits, full.nested_layers()[name].out_splits
        if space.is_single_group:
            continue
        units = space.channels // space.unit  # near-equal primary groups, the remainder to the first
        primaries = [units // K_PRIMARY + (g < units % K_PRIMARY) for g in range(K_PRIMARY)]
        for g in range(K_PRIMARY - 1):  # the added group k + g holds copies of round(f · size) units
            expected = round(fraction * primaries[g]) * space.unit if full_splits[K_PRIMARY + g] else 0
            assert splits[K_PRIMARY + g] == expected, (name, g)
        assert splits[:K_PRIMARY] == full_splits[:K_PRIMARY] == tuple(size * space.unit for size in primaries)
    macs = [net.macs(net.num_subnets) for net in (truncated, partial, full)]
    assert macs[0] <= macs[1] <= macs[2] and (fraction == 0 or macs[1] < macs[2])
    assert_paths_agree(partial, images, export=True)


def test_later_groups_never_change_earlier_subnets(images):
    net = nested_toy(exact=False, copy_fraction=0.5)
    assert_earlier_subnets_ignore_later_groups(net, images)


def test_greedy_groups_and_copies_follow_the_energy_the_units_lose():
    """Paper Algorithm 1 with partial copies, on every layout with something to select: group g holds
    the remaining units that lose the least energy to the inputs N_{g+1} cannot see (input groups > g),
    and within it the units with copies lose at least as much as those without. Energies from plain
    convolutions of the base layer on its calibration input (checks.lost_energy)."""
    calib = torch.randn(8, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    base = toy(nn.ReLU).eval()
    net = nested_toy(exact=False, copy_fraction=0.5, calib=calib)
    layers = {layout: base.get_submodule(net.base_module_name(layout)) for layout in net.rdn_config["orders"]}
    inputs = {}
    hooks = [layer.register_forward_hook(lambda module, args, output, key=layout: inputs.__setitem__(key, args[0]))
             for layout, layer in layers.items()]  # fmt: skip
    with torch.no_grad():
        base(calib)
    for hook in hooks:
        hook.remove()
    checked = 0
    for layout, order in net.rdn_config["orders"].items():
        in_space, space = net.nested_spaces(layout)
        groups = torch.zeros(in_space.channels, dtype=torch.long)  # an un-nested input: all in group 0
        if not in_space.is_single_group:
            groups = in_space.primary_group_of_channel
        start = 0
        for g, size in enumerate(space.primary_sizes[:-1]):
            energy = lost_energy(layers[layout], inputs[layout], groups > g).view(-1, space.unit).sum(1)
            units, later = order[start : start + size], order[start + size :]
            if energy.max() == 0:  # nothing to select by (N_{g+1} sees every input): recorded as a tie
                assert g in net.rdn_config["ties"]["select"][layout]
                start += size
                continue
            tolerance = 1e-6 * energy.max()  # the selection sums in float32
            assert energy[units].max() <= energy[later].min() + tolerance, (layout, g)
            copied = space.copied[g]
            assert 0 < copied < size
            assert energy[units[:copied]].min() >= energy[units[copied:]].max() - tolerance, (layout, g)
            checked += 1
            start += size
    assert checked >= 3  # not vacuous: three layouts read nested tensors, two groups each


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
