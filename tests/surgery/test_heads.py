"""Full-depth heads are stored as they are applied: one folded ``nn.Linear(F_s, C)`` per exit;
state dicts of the older layout (alignment ``F_s → F`` before a shared classifier) still load."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from rdn.surgery import RussianDollNet, costs, nest
from rdn.train.checkpoint import load_state_strict
from tests.surgery.checks import logits_by_path
from tests.surgery.toys import toy

CALIB = torch.randn(8, 3, 10, 10, generator=torch.Generator().manual_seed(2))
IMAGES = torch.randn(5, 3, 10, 10, generator=torch.Generator().manual_seed(1))


def nested(depth_split: str | None = None, **kwargs) -> RussianDollNet:
    return nest(toy(**kwargs), k=3, calib=CALIB, skip=["stem"], depth_split=depth_split, exact=True).eval()


def old_layout(net: RussianDollNet, seed: int = 0) -> tuple[OrderedDict, list[torch.Tensor], nn.Linear]:
    """A state dict of ``net``'s structure in the version-1 layout: dense alignments (F, F_s) and a
    classifier (F → C) after them; returns it, the alignments and that classifier."""
    generator = torch.Generator().manual_seed(seed)
    heads = net.plan.heads
    state = OrderedDict((key, value) for key, value in net.state_dict().items() if not key.startswith("heads."))
    classifier = nn.Linear(heads.feature_width, heads.num_classes)
    with torch.no_grad():
        classifier.weight.copy_(torch.randn(classifier.weight.shape, generator=generator))
        classifier.bias.copy_(torch.randn(classifier.bias.shape, generator=generator))
    alignments = [torch.randn(heads.feature_width, heads.features_of(s), generator=generator)
                  for s in range(1, net.num_groups + 1)]  # fmt: skip
    for s, alignment in enumerate(alignments):
        state[f"heads.{s}.weight"] = alignment
    if heads.split is None:  # version 1 always had the shared classifier
        state["classifier.weight"], state["classifier.bias"] = classifier.weight.detach(), classifier.bias.detach()
    else:
        classifier.load_state_dict({"weight": state["classifier.weight"], "bias": state["classifier.bias"]})
    state._metadata = OrderedDict(net.state_dict()._metadata)
    state._metadata[""] = {"version": 1}
    return state, alignments, classifier


def test_heads_are_the_folded_alignment_and_classifier():
    """N_K's head starts as the base classifier on the features it copies (exact: the same logits)."""
    model = toy()
    net = nest(model, k=3, calib=CALIB, skip=["stem"], exact=True).eval()
    heads = net.plan.heads
    for s, head in enumerate(net.heads, start=1):
        assert isinstance(head, nn.Linear) and head.weight.shape == (heads.num_classes, heads.features_of(s))
        assert torch.equal(head.bias, model.fc.bias)
    assert isinstance(net.classifier, nn.Identity) and not list(net.classifier.parameters())
    with torch.no_grad():
        torch.testing.assert_close(net(IMAGES)[-1], model.eval()(IMAGES), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("depth_split", [None, "body.2"])
def test_stored_parameters_are_what_the_costs_count(depth_split):
    """A checkpoint's size follows the parameter count: every head's stored parameters are what
    ``params`` counts for it (full-depth: F_s·C + C; shallow: its block and the shared classifier)."""
    net = nested(depth_split)
    classifier = sum(p.numel() for p in net.classifier.parameters())
    for subnet, (s, depth) in enumerate(net.exits, start=1):
        head = net.heads[s - 1] if depth == 1 else net.depth_heads[s - 1]
        stored = sum(p.numel() for p in head.parameters()) + (classifier if depth == 0 else 0)
        assert costs.head_costs(net.plan, s, depth)[1] == stored
        assert net.params(subnet) >= stored
    head_floats = sum(value.numel() for key, value in net.state_dict().items() if key.startswith("heads."))
    assert head_floats == sum((net.plan.heads.features_of(s) + 1) * 5 for s in range(1, net.num_groups + 1))


@pytest.mark.parametrize("depth_split", [None, "body.2"])
@pytest.mark.parametrize("with_metadata", [True, False])
def test_version_1_state_dicts_load_folded(depth_split, with_metadata):
    net = nested(depth_split)
    state, alignments, classifier = old_layout(net)
    if not with_metadata:  # a state dict rebuilt key by key: told by the heads' shapes
        state = OrderedDict(state.items())
    features = torch.randn(4, net.plan.heads.feature_space.offsets[-1])
    upgraded = net.upgrade_state_dict(state)
    assert set(upgraded) == set(net.state_dict()) and "heads.0.weight" in state  # the argument is left alone
    for s in range(net.num_groups):
        assert upgraded[f"heads.{s}.weight"].shape == net.heads[s].weight.shape
    net.load_state_dict(state)
    with torch.no_grad():
        for s, alignment in enumerate(alignments, start=1):
            prefix = features[:, : net.plan.heads.features_of(s)]
            torch.testing.assert_close(net.heads[s - 1](prefix), classifier(prefix @ alignment.T))
        rebuilt = RussianDollNet.from_config(net.record, toy())
        rebuilt.load_state_dict(upgraded)
        for a, b in zip(rebuilt.eval()(IMAGES), net(IMAGES), strict=True):
            assert torch.equal(a, b)


def test_version_tells_the_layout_when_features_and_classes_agree():
    """F = C: the heads' shapes cannot tell the layouts apart; the state dict's version does."""
    net = nested(num_classes=16)  # ToyNet's pooled features are 16 wide
    assert net.plan.heads.feature_width == net.plan.heads.num_classes == 16
    current = net.state_dict()
    assert current._metadata[""]["version"] == 2
    state, alignments, classifier = old_layout(net)
    net.load_state_dict(state)
    torch.testing.assert_close(net.heads[0].weight, classifier.weight.detach() @ alignments[0])
    again = nested(num_classes=16)
    again.load_state_dict(current)  # version 2: loaded as it is
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), current.values(), strict=True))


def test_a_checkpoint_written_before_the_plan_gives_the_same_logits():
    """data/version1_depth_split.pt was written by the code before the plan / executor split and the
    folded heads: ``nest(toy(), k=3, skip=["stem"], depth_split="body.2")`` with every parameter moved
    (dense heads), its flat version-1 rdn_config, its state dict (unfolded heads) and the logits of every
    exit through every path. Rebuilt and loaded now, it gives those logits (bit-identical on the machine
    that wrote them; other CPUs may round convolutions differently, hence the tight tolerance)."""
    saved = torch.load(Path(__file__).parent / "data" / "version1_depth_split.pt", weights_only=True)
    net = RussianDollNet.from_config(json.loads(saved["rdn_config"]), model=toy())
    load_state_strict(net, saved["state"], "version1_depth_split.pt")
    net.eval()
    images = saved["images"]
    assert [net.macs(e) for e in range(1, net.num_subnets + 1)] == saved["macs"]
    assert [net.peak_activation_bytes(e) for e in range(1, net.num_subnets + 1)] == saved["peak"]
    now = logits_by_path(net, images, range(1, net.num_subnets + 1))
    paths = {"one pass": "one_pass", "subnet=e": "alone", "staged": "staged", "export": "export"}
    for path, key in paths.items():
        for subnet, logits in now[path].items():
            torch.testing.assert_close(logits, saved["logits"][key][subnet - 1], rtol=1e-6, atol=1e-6)
