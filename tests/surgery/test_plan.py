"""The seam between the surgery and the network: a plain-data plan, executed; passes return edits."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from rdn.models.profile import profile_model
from rdn.surgery import Plan, Role, RussianDollNet, costs, nest
from rdn.surgery.build import rebuild
from rdn.surgery.passes.budget import apply_pruned_blocks, prune_blocks
from tests.surgery.toys import toy

CALIB = torch.randn(8, 3, 10, 10, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def net() -> RussianDollNet:
    return nest(toy(), k=3, calib=CALIB, skip=["stem"], exact=False, depth_split="body.2").eval()


def _structure(plan: Plan) -> list:
    return [(step.name, step.role, step.space, step.input_space, step.module, step.layer) for step in plan.steps]


def test_the_plan_is_frozen_data_with_roles(net):
    plan = net.plan
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.num_groups = 2
    assert all(isinstance(step.role, Role) and step.role is not Role.OPAQUE for step in plan.steps)
    assert {step.name for step in plan.layer_steps()} == set(net.layers)
    assert [step.name for step in plan.nested_steps()] == list(net.nested_layers())
    for step in plan.nested_steps():  # the plan's layout is what the layer computes
        assert net.layers[step.name].layout == step.layer.layout
    assert plan.exits == tuple(net.exits) and plan.num_subnets == net.num_subnets == 2 * plan.num_groups
    assert plan.region_of(plan.heads.split) == 0 and plan.region_of(plan.heads.features) == 1
    with pytest.raises(KeyError, match="'nowhere' is not a node"):
        plan.step("nowhere")


def test_costs_are_functions_of_the_plan(net):
    for subnet in range(1, net.num_subnets + 1):
        assert costs.macs(net.plan, subnet) == net.macs(subnet)
        assert costs.params(net.plan, subnet) == net.params(subnet)
        assert costs.peak_activation_bytes(net.plan, subnet, 2) == net.peak_activation_bytes(subnet, 2)
    # N_K at full depth runs every layer's every block: the hooks of rdn.models.profile count the same
    assert net.macs(net.num_subnets) == profile_model(_LastExit(net), (1, 3, 10, 10)).macs


class _LastExit(nn.Module):
    def __init__(self, net: RussianDollNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x, subnet=self.net.num_subnets)


def test_a_record_rebuilds_the_same_plan(net):
    plan, modules = rebuild(net.record, toy(seed=5))
    assert plan.record == net.record and _structure(plan) == _structure(net.plan)
    assert plan.heads == net.plan.heads and plan.lifetimes == net.plan.lifetimes
    twin = RussianDollNet(plan, modules)
    twin.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(twin.eval()(CALIB), net(CALIB), strict=True))


def test_the_budget_pass_returns_an_edit():
    net = nest(toy(), k=3, calib=CALIB, skip=["stem"], exact=False, mac_budget=None)  # unpruned: the pass prunes
    before = {name: layer.layout for name, layer in net.nested_layers().items()}
    base_macs = profile_model(toy(), (1, 3, 10, 10)).macs
    pruning = prune_blocks(net, CALIB, 1.2, base_macs)
    assert pruning.pruned and {name: layer.layout for name, layer in net.nested_layers().items()} == before
    assert net.record.pruned_blocks == {}
    edited = net.plan.with_pruned_blocks(pruning.pruned)
    assert net.record.pruned_blocks == {} and edited.record.pruned_blocks  # the old plan is left alone
    assert costs.macs(edited, net.num_subnets) <= 1.2 * base_macs < net.macs(net.num_subnets)
    apply_pruned_blocks(net, pruning.pruned)
    assert net.macs(net.num_subnets) == costs.macs(edited, net.num_subnets)
    assert net.record.pruned_blocks == edited.record.pruned_blocks
    with pytest.raises(ValueError, match="an edit of this network's plan"):
        net.use_plan(nest(toy(), k=2, calib=CALIB, skip=["stem"]).plan)


def test_feature_map_elements_count_every_node_output_but_the_classifier():
    """costs.activation_elements: the base model's count is every traced node's output size (ShapeProp); a
    truncated RDN's N_K computes the base channels, so it counts the same; expand's copies add to it."""
    from torch import fx
    from torch.fx.passes.shape_prop import ShapeProp

    base = toy().eval()
    traced = fx.symbolic_trace(base)
    ShapeProp(traced).propagate(CALIB[:1])
    outputs = [node for node in traced.graph.nodes if node.op not in ("placeholder", "output")]
    expected = sum(node.meta["tensor_meta"].shape.numel() for node in outputs[:-1])  # the last: the classifier
    assert isinstance(traced.get_submodule(outputs[-1].target), nn.Linear)
    truncated = nest(toy(), k=3, calib=CALIB, skip=["stem"], mode="truncate")
    K = truncated.num_subnets
    assert costs.base_activation_elements(truncated.plan) == expected == costs.activation_elements(truncated.plan, K)
    expanded = nest(toy(), k=3, calib=CALIB, skip=["stem"], exact=False, mac_budget=None)
    counts = [costs.activation_elements(expanded.plan, s) for s in range(1, expanded.num_subnets + 1)]
    assert counts == sorted(counts) and counts[0] < expected < counts[-1]
    assert costs.base_activation_elements(expanded.plan) == expected
    assert costs.activation_ratio(expanded.plan, expanded.num_subnets) == counts[-1] / expected
