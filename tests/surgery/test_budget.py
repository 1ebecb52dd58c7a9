"""``nest(..., mac_budget=...)``: blocks of the added groups dropped until N_K fits (rdn/surgery/budget.py)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rdn.models.profile import profile_model
from rdn.surgery import RussianDollNet
from rdn.surgery.budget import _candidates, _kept_per_row, apply_pruned_blocks
from tests.surgery.checks import assert_earlier_subnets_ignore_later_groups, assert_paths_agree
from tests.surgery.test_nest import nested_toy
from tests.surgery.toys import toy

K_PRIMARY = 3  # nested_toy's k: groups 0..2 are primary, 3..4 added


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 10, 10, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def base_macs() -> int:
    return profile_model(toy(nn.ReLU), (1, 3, 10, 10)).macs


@pytest.mark.parametrize("budget", [1.3, 1.2])
def test_budget_is_met_and_only_added_groups_change(images, base_macs, budget):
    full, pruned = nested_toy(exact=False), nested_toy(exact=False, mac_budget=budget)
    assert full.macs(full.num_subnets) > budget * base_macs  # the budget bites
    assert pruned.macs(pruned.num_subnets) <= budget * base_macs
    assert pruned.rdn_config["mac_budget"] == budget and pruned.rdn_config["pruned_blocks"]
    for name, layer in pruned.nested_layers().items():
        before, after = full.nested_layers()[name].layout.mask, layer.layout.mask
        for j in range(layer.num_groups):
            if j < K_PRIMARY:
                assert after[j] == before[j]
            if any(before[j]):
                assert any(after[j]), f"{name}: output group {j} lost every block"
        dropped = [[j, i] for j in range(layer.num_groups) for i in range(j + 1) if before[j][i] and not after[j][i]]
        assert dropped == sorted(pruned.rdn_config["pruned_blocks"].get(name, []))
        assert torch.all(layer.weight[~layer.weight_mask()] == 0)
    with torch.no_grad():
        for s in range(1, K_PRIMARY + 1):  # N_1..N_k are exactly the unpruned RDN's
            assert torch.equal(pruned(images, subnet=s), full(images, subnet=s))
        assert not torch.allclose(pruned(images, subnet=5), full(images, subnet=5))


def test_pruned_rdn_keeps_one_pass_and_staged_paths_and_the_nesting(images):
    net = nested_toy(exact=False, mac_budget=1.2)
    assert_paths_agree(net, images, export=True)
    assert_earlier_subnets_ignore_later_groups(net, images)


def test_blocks_drop_in_order_of_energy_per_mac(images):
    """Every dropped block costs less energy per MAC saved than any droppable block that stays."""
    net = nested_toy(exact=False)
    blocks, _ = _candidates(net, torch.randn(8, 3, 10, 10, generator=torch.Generator().manual_seed(2)), K_PRIMARY)
    assert blocks and all(block.out_group >= K_PRIMARY and 0 <= block.score <= 1 for block in blocks)
    pruned = nested_toy(exact=False, mac_budget=1.2).rdn_config["pruned_blocks"]
    kept = _kept_per_row(blocks)
    dropped = [b for b in blocks if [b.out_group, b.in_group] in pruned.get(b.layer, [])]
    staying = [b for b in blocks if b not in kept and b not in dropped]
    assert dropped and not set(dropped) & kept
    assert max(b.score / b.macs for b in dropped) <= min(b.score / b.macs for b in staying)


def test_config_round_trip_restores_the_masks(images):
    net = nested_toy(exact=False, mac_budget=1.2)
    config = json.loads(json.dumps(net.rdn_config))
    rebuilt = RussianDollNet.from_config(config, model=toy(nn.ReLU, seed=11))
    for name, layer in rebuilt.nested_layers().items():
        assert layer.layout == net.nested_layers()[name].layout
    assert rebuilt.macs(rebuilt.num_subnets) == net.macs(net.num_subnets)
    rebuilt.load_state_dict(net.state_dict())
    with torch.no_grad():
        for a, b in zip(rebuilt.eval()(images), net(images), strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_loose_budget_prunes_nothing(base_macs):
    net = nested_toy(exact=False, mac_budget=2.0)
    assert net.rdn_config["pruned_blocks"] == {}
    assert net.macs(net.num_subnets) == nested_toy(exact=False).macs(net.num_subnets)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(mac_budget=0.0), ValueError, "must be > 0"),
        (dict(mac_budget="1.2"), TypeError, "finite number"),
        (dict(mac_budget=True), TypeError, "finite number"),
        (dict(mac_budget=float("nan")), TypeError, "finite number"),
        (dict(mac_budget=1.2, mode="truncate"), ValueError, "mode='truncate' has none"),
        (dict(mac_budget=0.9, exact=False), ValueError, "mac_budget=0.9 is out of reach"),
        (dict(mac_budget=1.2), ValueError, "exact=False does not"),
    ],
)
def test_bad_budgets(kwargs, error, match):
    with pytest.raises(error, match=match):
        nested_toy(**kwargs)


def test_bad_pruned_blocks():
    net = nested_toy(exact=False)
    name = next(iter(net.nested_layers()))
    with pytest.raises(ValueError, match="not a nested layer"):
        apply_pruned_blocks(net, {"nope": [[3, 0]]})
    with pytest.raises(ValueError, match=r"\(1, 2\) is not a block"):
        apply_pruned_blocks(net, {name: [[1, 2]]})
