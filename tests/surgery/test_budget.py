"""``nest(..., mac_budget=...)``: blocks of the added groups dropped until N_K fits (rdn/surgery/passes/budget.py).

The pass alone: every test here fixes ``copy_fraction=1`` and ``compensate=False`` (``PASS_ONLY``), so
the budget's search has one candidate; tests/surgery/test_search.py covers the search."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rdn.models.profile import profile_model
from rdn.nn import NestedConv2d
from rdn.surgery import RussianDollNet
from rdn.surgery.passes.budget import apply_pruned_blocks
from tests.surgery.checks import assert_earlier_subnets_ignore_later_groups, assert_paths_agree
from tests.surgery.test_nest import nested_toy
from tests.surgery.toys import toy

K_PRIMARY = 3  # nested_toy's k: groups 0..2 are primary, 3..4 added
PASS_ONLY = {"copy_fraction": 1.0, "compensate": False}  # one construction: the budget pass decides alone
UNPRUNED = {"mac_budget": None}  # every copy, every block


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 10, 10, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def base_macs() -> int:
    return profile_model(toy(nn.ReLU), (1, 3, 10, 10)).macs


@pytest.mark.parametrize("budget", [1.3, 1.2])
def test_budget_is_met_and_only_added_groups_change(images, base_macs, budget):
    full, pruned = nested_toy(exact=False, **UNPRUNED), nested_toy(exact=False, mac_budget=budget, **PASS_ONLY)
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
    net = nested_toy(exact=False, mac_budget=1.2, **PASS_ONLY)
    assert_paths_agree(net, images, export=True)
    assert_earlier_subnets_ignore_later_groups(net, images)


Block = tuple[str, int, int]  # (nested layer, output group, input group)


@torch.no_grad()
def block_scores(net: RussianDollNet, calib: torch.Tensor, first_group: int) -> dict[Block, tuple[float, int]]:
    """(share of its output group's energy, MACs per sample) of every block of the output groups >=
    ``first_group``, from first principles: the input X of every nested layer in one N_K forward of
    ``calib``, and each block's contribution W[rows j, columns i] ⊗ X[columns i], computed in float64
    with ``F.conv2d`` / ``F.linear`` on those slices; its energy is the squared norm over the images
    and pixels, its share that energy over the sum of its output group's."""
    inputs: dict[str, torch.Tensor] = {}
    layers = net.nested_layers()
    hooks = [layer.register_forward_hook(lambda module, args, output, name=name: inputs.__setitem__(name, args[0]))
             for name, layer in layers.items()]  # fmt: skip
    try:
        net(calib)
    finally:
        for hook in hooks:
            hook.remove()
    scores: dict[Block, tuple[float, int]] = {}
    for name, layer in layers.items():
        rows, columns, x = layer.layout.out_offsets, layer.layout.in_offsets, inputs[name].double()
        for j in range(first_group, layer.num_groups):
            energies, macs = {}, {}
            for i in range(j + 1):
                if not layer.block_mask[j, i]:
                    continue
                weight = layer.weight[rows[j] : rows[j + 1], columns[i] : columns[i + 1]].double()
                x_i = x[:, columns[i] : columns[i + 1]]
                if isinstance(layer, NestedConv2d):
                    y = F.conv2d(x_i, weight, None, layer.stride, layer.padding, layer.dilation)
                else:
                    y = F.linear(x_i, weight)
                energies[i] = float(y.pow(2).sum())
                macs[i] = weight.numel() * math.prod(y.shape[2:])  # per sample: out × in × kernel × pixels
            total = sum(energies.values())
            for i, energy in energies.items():
                scores[(name, j, i)] = (energy / total, macs[i])
    return scores


@pytest.mark.parametrize("budget", [1.3, 1.2])  # at 1.3, ordering by energy alone (not per MAC) drops other blocks
def test_blocks_drop_in_order_of_energy_per_mac(base_macs, budget):
    """Every dropped block costs less energy per MAC saved than any droppable block that stays (each
    output group keeps its best block), and dropping stopped as soon as N_K fit."""
    calib = torch.randn(8, 3, 10, 10, generator=torch.Generator().manual_seed(2))  # nested_toy's
    scores = block_scores(nested_toy(exact=False, calib=calib, **UNPRUNED), calib, K_PRIMARY)
    net = nested_toy(exact=False, calib=calib, mac_budget=budget, **PASS_ONLY)
    dropped = {(name, j, i) for name, blocks in net.rdn_config["pruned_blocks"].items() for j, i in blocks}
    best = {}
    for block, (score, _) in scores.items():
        row = block[:2]
        if row not in best or score > scores[best[row]][0]:
            best[row] = block
    kept, ratio = set(best.values()), {block: score / macs for block, (score, macs) in scores.items()}
    staying = set(scores) - kept - dropped
    assert dropped and staying and dropped <= set(scores) and not dropped & kept
    assert max(ratio[b] for b in dropped) <= min(ratio[b] for b in staying) * (1 + 1e-6)
    limit = math.floor(budget * base_macs)
    last = max(dropped, key=lambda b: (ratio[b], -scores[b][1]))
    assert net.macs(net.num_subnets) <= limit < net.macs(net.num_subnets) + scores[last][1]


def test_config_round_trip_restores_the_masks(images):
    net = nested_toy(exact=False, mac_budget=1.2, **PASS_ONLY)
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
    net = nested_toy(exact=False, mac_budget=2.0, **PASS_ONLY)
    assert net.rdn_config["pruned_blocks"] == {}
    assert net.macs(net.num_subnets) == nested_toy(exact=False, **UNPRUNED).macs(net.num_subnets)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(mac_budget=0.0), ValueError, "must be > 0"),
        (dict(mac_budget="1.2"), TypeError, "finite number"),
        (dict(mac_budget=True), TypeError, "finite number"),
        (dict(mac_budget=float("nan")), TypeError, "finite number"),
        (dict(mac_budget=1.5, mode="truncate"), ValueError, "mode='truncate' has none"),
        (dict(mac_budget=0.9, exact=False, **PASS_ONLY), ValueError, "mac_budget=0.9 is out of reach"),
        (dict(mac_budget=0.3, exact=False), ValueError, "mac_budget=0.3 is out of reach for every construction"),
        (dict(mac_budget=1.5), ValueError, "exact=True .* takes no mac_budget"),
    ],
)
def test_bad_budgets(kwargs, error, match):
    with pytest.raises(error, match=match):
        nested_toy(**kwargs)


def test_bad_pruned_blocks():
    net = nested_toy(exact=False, **UNPRUNED)
    name = next(iter(net.nested_layers()))
    with pytest.raises(ValueError, match="not a nested layer"):
        apply_pruned_blocks(net, {"nope": [[3, 0]]})
    with pytest.raises(ValueError, match=r"\(1, 2\) is not a block"):
        apply_pruned_blocks(net, {name: [[1, 2]]})
