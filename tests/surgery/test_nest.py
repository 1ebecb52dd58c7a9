"""Surgery on hand-built toy networks: properties P1–P5, staged path, costs, config, bad input."""

from __future__ import annotations

import functools
import io
import json

import pytest
import torch
from torch import nn

from rdn.models import create
from rdn.nn import NestedConv2d
from rdn.surgery import RussianDollNet, nest
from rdn.surgery.graph import SurgeryGraph
from rdn.surgery.passes.select import greedy_order
from tests.surgery.checks import (
    assert_earlier_subnets_ignore_later_groups,
    lost_energy,
    relative_error,
    staged_states,
)
from tests.surgery.toys import fused_norm_net, hand_count_net, squeeze_excite_net, toy

ATOL = 1e-5
# (mode, exact, copies)
MODES = [
    ("expand", True, "latest"),
    ("expand", False, "latest"),
    ("expand", True, "sum"),
    ("expand", False, "sum"),
    ("truncate", True, "latest"),
]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 10, 10, generator=torch.Generator().manual_seed(1))


def nested_toy(act=nn.ReLU, mode="expand", exact=True, select="greedy", k=3, calib=None, **kwargs) -> RussianDollNet:
    calib = torch.randn(8, 3, 10, 10, generator=torch.Generator().manual_seed(2)) if calib is None else calib
    if mode == "expand" and not exact:  # every copy, pruned to the MAC budget: the properties see every pass
        kwargs.setdefault("copy_fraction", 1.0)
    return nest(toy(act), k=k, mode=mode, exact=exact, select=select, calib=calib, skip=["stem"], **kwargs).eval()


@pytest.mark.parametrize("mode, exact, copies", MODES)
def test_subnet_count_and_one_pass_equals_separate_passes(images, mode, exact, copies):
    """P2: the K logits of one pass of N_K equal K separate passes of N_1..N_K."""
    rdn = nested_toy(mode=mode, exact=exact, copies=copies)
    assert rdn.num_subnets == (5 if mode == "expand" else 3)
    with torch.no_grad():
        logits = rdn(images)
        assert len(logits) == rdn.num_subnets
        for s, one_pass in enumerate(logits, start=1):
            torch.testing.assert_close(rdn(images, subnet=s), one_pass, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("mode, exact, copies", MODES)
def test_staged_steps_equal_direct_subnets(images, mode, exact, copies):
    rdn = nested_toy(mode=mode, exact=exact, copies=copies)
    with torch.no_grad():
        state = rdn.start(images)
        torch.testing.assert_close(state.logits, rdn(images, subnet=1), atol=ATOL, rtol=ATOL)
        for s in range(2, rdn.num_subnets + 1):
            state = rdn.step(state)
            assert state.subnet == s
            torch.testing.assert_close(state.logits, rdn(images, subnet=s), atol=ATOL, rtol=ATOL)
        with pytest.raises(ValueError, match="last exit"):
            rdn.step(state)


def test_staged_state_keeps_selected_samples(images):
    rdn = nested_toy()
    with torch.no_grad():
        keep = torch.tensor([0, 3, 4])
        state = rdn.step(rdn.start(images).index_select(keep))
        torch.testing.assert_close(state.logits, rdn(images[keep], subnet=2), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("depth_split", [None, "body.2"])
@pytest.mark.parametrize("jumps", [(3,), (2, 5), (4, 5)])
def test_staged_jumps_equal_direct_subnets(images, depth_split, jumps):
    """step(state, t) computes every group up to exit t in one go; the heads of the exits it
    jumped over read their (cached) features, unless a jump to a shallow exit skipped them."""
    rdn = nested_toy(depth_split=depth_split)
    with torch.no_grad():
        state, passed = rdn.start(images), 1
        for target in jumps:
            state = rdn.step(state, target)
            assert state.subnet == target
            torch.testing.assert_close(state.logits, rdn(images, subnet=target), atol=ATOL, rtol=ATOL)
            for subnet in range(passed + 1, target):
                if depth_split is not None and rdn.exits[subnet - 1][1] > rdn.exits[target - 1][1]:
                    with pytest.raises(ValueError, match="whose groups the state has computed"):
                        rdn.exit_logits(state, subnet)
                else:
                    torch.testing.assert_close(
                        rdn.exit_logits(state, subnet), rdn(images, subnet=subnet), atol=ATOL, rtol=ATOL
                    )
            passed = target
        first = rdn.start(images)
        with pytest.raises(ValueError, match="later exit"):
            rdn.step(first, 1)
        with pytest.raises(ValueError, match="subnet must satisfy"):
            rdn.step(first, rdn.num_subnets + 1)
        with pytest.raises(ValueError, match="whose groups the state has computed"):
            rdn.exit_logits(first, 2)


@pytest.mark.parametrize("mode, exact, copies", MODES)
def test_later_groups_never_change_earlier_subnets(images, mode, exact, copies):
    """P1 on parameters and buffers: perturbing everything of groups >= s leaves N_s's logits bit-equal
    through every path (tests/surgery/checks.py)."""
    assert_earlier_subnets_ignore_later_groups(nested_toy(mode=mode, exact=exact, copies=copies), images)


@pytest.mark.parametrize("mode, exact, copies", MODES)
def test_later_activations_never_change_earlier_subnets(images, mode, exact, copies):
    """P1 on activations: in the one-pass forward (the only path that computes the later groups
    alongside N_s's), shifting every nested layer's later output groups leaves N_s's logits bit-equal."""
    rdn = nested_toy(mode=mode, exact=exact, copies=copies)
    for s in range(1, rdn.num_subnets):
        with torch.no_grad():
            before = rdn(images)

        def shift_later_groups(layer, args, output, s=s):
            output = output.clone()
            output[:, layer.layout.out_offsets[s] :] += 100.0
            return output

        hooks = [layer.register_forward_hook(shift_later_groups) for layer in rdn.nested_layers().values()]
        try:
            with torch.no_grad():
                after = rdn(images)
        finally:
            for hook in hooks:
                hook.remove()
        assert all(torch.equal(after[e], before[e]) for e in range(s))
        assert not torch.allclose(after[s], before[s])  # N_{s+1} reads the shifted groups: the shift is real


@pytest.mark.parametrize("copies", ["sum", "latest"])
def test_expand_reproduces_linear_stack_exactly(images, copies):
    """P3: with no non-linearity (identity activations), expand + exact reproduces the base model."""
    base = toy(nn.Identity)
    with torch.no_grad():
        expected = base(images)
        assert relative_error(nested_toy(nn.Identity, copies=copies)(images)[-1], expected) < 1e-5
        # Without the last copy the connections from late input copies are dropped.
        assert relative_error(nested_toy(nn.Identity, exact=False, copies=copies)(images)[-1], expected) > 1e-3
        assert relative_error(nested_toy(nn.Identity, mode="truncate")(images)[-1], expected) > 1e-3


def test_latest_copies_reproduce_the_base_through_non_linearities(images):
    """copies="latest": every channel's last copy is a whole value, so N_K is the base model, ReLUs included."""
    base = toy(nn.ReLU)
    with torch.no_grad():
        expected = base(images)
        expand = relative_error(nested_toy(nn.ReLU)(images)[-1], expected)
        truncate = relative_error(nested_toy(nn.ReLU, mode="truncate")(images)[-1], expected)
    assert expand < 1e-5 < truncate


def test_greedy_selection_minimises_invisible_energy():
    """P4 (layer level): greedy's first group is the 4 outputs that lose the least energy to the inputs
    N_1 cannot see, so it loses less than any random split (energies from plain convolutions)."""
    generator = torch.Generator().manual_seed(4)
    conv = nn.Conv2d(12, 16, 3, padding=1)
    x = torch.randn(4, 12, 6, 6, generator=generator)
    input_groups = torch.randperm(12, generator=generator) % 4  # k = 4 input groups of 3
    sizes = (4, 4, 4, 4)
    lost = lost_energy(conv, x, input_groups > 0)  # N_1's reconstruction error, per output channel

    greedy = greedy_order(conv, x, input_groups, 1, sizes)
    assert sorted(greedy.order) == list(range(16)) and greedy.tied_groups == []
    assert set(greedy.order[:4]) == set(torch.argsort(lost)[:4].tolist())
    randoms = [torch.randperm(16, generator=generator).tolist() for _ in range(20)]
    assert lost[greedy.order[:4]].sum() <= min(lost[order[:4]].sum() for order in randoms)
    # group 2 (seen by N_2) is the 4 of the rest that lose the least to input groups > 1
    lost_2 = lost_energy(conv, x, input_groups > 1)
    rest = torch.tensor(greedy.order[4:])
    assert set(greedy.order[4:8]) == set(rest[torch.argsort(lost_2[rest])[:4]].tolist())


def test_greedy_lowers_first_subnet_error_on_toy(images):
    """P4 (network level, seeded): greedy gives N_1 a smaller logit error than random selection."""
    base = toy(nn.ReLU)
    with torch.no_grad():
        expected = base(images)
        greedy = relative_error(nested_toy(nn.ReLU, k=2)(images, subnet=1), expected)
        randoms = [
            relative_error(nested_toy(nn.ReLU, k=2, select="random", seed=seed)(images, subnet=1), expected)
            for seed in range(4)
        ]
    assert greedy < sum(randoms) / len(randoms)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
@pytest.mark.parametrize("mode, exact, copies", MODES)
def test_export_is_plain_torch_and_equal(images, mode, exact, copies, tmp_path):
    """P5: export(s) is made of stock torch layers and computes N_s."""
    rdn = nested_toy(mode=mode, exact=exact, copies=copies)
    for s in range(1, rdn.num_subnets + 1):
        exported = rdn.export(s).eval()
        for module in exported.modules():
            assert type(module).__module__.startswith("torch."), type(module)
        with torch.no_grad():
            torch.testing.assert_close(exported(images), rdn(images, subnet=s), atol=ATOL, rtol=ATOL)
    buffer = io.BytesIO()
    torch.save(exported, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    traced = torch.jit.trace(exported, images)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), exported(images))
        torch.testing.assert_close(traced(images), exported(images))


def test_export_to_onnx(images, tmp_path):
    pytest.importorskip("onnx")
    exported = nested_toy().export(2).eval()
    torch.onnx.export(exported, (images,), str(tmp_path / "n2.onnx"))
    assert (tmp_path / "n2.onnx").stat().st_size > 0


def test_config_round_trip(images):
    rdn = nested_toy(select="random", seed=7)
    with torch.no_grad():
        for parameter in rdn.parameters():
            parameter.add_(0.01)
    config = json.loads(json.dumps(rdn.rdn_config))
    rebuilt = RussianDollNet.from_config(config, model=toy(nn.ReLU, seed=11))
    rebuilt.load_state_dict(rdn.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        for a, b in zip(rebuilt(images), rdn(images), strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="no 'base'"):
        RussianDollNet.from_config(config)
    with pytest.raises(ValueError, match="architecture differs"):
        RussianDollNet.from_config(config, model=toy(nn.ReLU, width=9))


def test_hand_counted_costs_truncate():
    """k=2 truncate on 3→4 (3×3, skipped) → 1×1 4→8 → BN → ReLU → 1×1 8→6 → pool → linear 6→5, 8×8 input."""
    rdn = nest(hand_count_net(), k=2, mode="truncate", calib=torch.randn(2, 3, 8, 8), skip=["0"])
    stem = 4 * 3 * 9 * 64
    # N_1: conv1 group 0 (4 out × 4 in), conv2 group 0 (3 out × 4 in); head 3→6 and classifier 6→5
    # folded into one 3→5 map.
    assert rdn.macs(1) == stem + 4 * 4 * 64 + 3 * 4 * 64 + 3 * 5
    # N_2: conv1 all 8 × 4; conv2 groups 0 (3×4) and 1 (3×8); head 6→6→5 folded.
    assert rdn.macs(2) == stem + 8 * 4 * 64 + (3 * 4 + 3 * 8) * 64 + 6 * 5
    # Parameters: the folded head of N_s is what it stores, nn.Linear(F_s, 5) with the classifier's bias.
    stem_params = 4 * 3 * 9 + 4
    assert rdn.params(1) == stem_params + 4 * 4 + 2 * 4 + 3 * 4 + (3 * 5 + 5)
    assert rdn.params(2) == stem_params + 8 * 4 + 2 * 8 + (3 * 4 + 3 * 8) + (6 * 5 + 5)
    assert rdn.heads[1].weight.shape == (5, 6) and rdn.heads[1].bias.shape == (5,)


@pytest.mark.parametrize("copies", ["sum", "latest"])
def test_hand_counted_costs_expand(copies):
    """k=2 expand (K=3) on the same net: conv1 reads one group, so only conv2 gets copies.

    conv2's output: primaries (3, 3) at groups 0, 1 and the copies of primary group 0 at group 2
    (3 channels). "sum": they read what the primaries could not, conv1's group 1 (4 channels);
    "latest": they recompute from both of conv1's groups (8 channels).
    """
    rdn = nest(hand_count_net(), k=2, mode="expand", copies=copies, calib=torch.randn(2, 3, 8, 8), skip=["0"])
    assert rdn.layers["_2"].out_splits == (4, 4, 0)
    assert rdn.layers["_5"].out_splits == (3, 3, 3)
    stem = 4 * 3 * 9 * 64
    conv1 = [4 * 4 * 64, 8 * 4 * 64, 8 * 4 * 64]
    copy_inputs = 4 if copies == "sum" else 8
    conv2 = [3 * 4 * 64, (3 * 4 + 3 * 8) * 64, (3 * 4 + 3 * 8 + 3 * copy_inputs) * 64]
    heads = [3 * 5, 6 * 5, 9 * 5]  # alignment (F_s → 6) and classifier (6 → 5) folded
    for s in (1, 2, 3):
        assert rdn.macs(s) == stem + conv1[s - 1] + conv2[s - 1] + heads[s - 1]


def test_peak_activation_memory_grows_with_subnet():
    rdn = nest(hand_count_net(), k=2, mode="truncate", calib=torch.randn(2, 3, 8, 8), skip=["0"])
    # N_1 peak: stem conv output (4×64 floats) alive with its ReLU output, or conv1/BN pair (4×64 each).
    assert rdn.peak_activation_bytes(1) == (4 * 64 + 4 * 64) * 4
    assert rdn.peak_activation_bytes(2) == (8 * 64 + 8 * 64) * 4
    assert rdn.peak_activation_bytes(2, batch_size=3) == 3 * rdn.peak_activation_bytes(2)


def test_uneven_channels_go_to_first_groups():
    rdn = nest(hand_count_net(), k=3, mode="truncate", calib=torch.randn(2, 3, 8, 8), skip=["0"])
    assert rdn.layers["_2"].out_splits == (3, 3, 2)  # 8 channels
    assert rdn.layers["_5"].out_splits == (2, 2, 2)


def test_training_pass_gives_gradients():
    rdn = nested_toy().train()
    logits = rdn(torch.randn(4, 3, 10, 10))
    sum(nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 3])) for out in logits).backward()
    for name, parameter in rdn.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    for layer in rdn.layers.values():
        if isinstance(layer, NestedConv2d):
            assert not layer.weight.grad[~layer.weight_mask()].any()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"k": 0}, ValueError, "k .* must be >= 1"),
        ({"k": 2.0}, TypeError, "k must be an int"),
        ({"k": 13}, ValueError, "k=13 is larger than"),
        ({"mode": "grow"}, ValueError, "mode must be one of"),
        ({"select": "best"}, ValueError, "select must be one of"),
        ({"copies": "all"}, ValueError, "copies must be one of"),
        ({"calib": None}, ValueError, "calib is required"),
        ({"calib": torch.randn(2, 5, 10, 10)}, ValueError, "calib has 5 channels .* takes 3"),
        ({"calib": torch.zeros(2, 3, 10, 10, dtype=torch.long)}, TypeError, "floating"),
        ({"calib": "images"}, TypeError, "calib must be"),
        ({"calib": [torch.randn(2, 3, 10, 10), torch.randn(2, 3, 12, 12)]}, ValueError, "one sample shape"),
        ({"skip": ["nonexistent"]}, ValueError, "not a sub-module"),
        ({"skip": ["stem", "body"]}, ValueError, "no nestable layer"),
        ({"depth_split": "nowhere"}, ValueError, "not a sub-module"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    arguments = {"k": 3, "calib": torch.randn(2, 3, 10, 10), "skip": ["stem"]} | kwargs
    with pytest.raises(error, match=match):
        nest(toy(), **arguments)


def test_bad_models_and_calls(images):
    with pytest.raises(ValueError, match="nn.Linear classifier"):
        nest(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1)), k=2, calib=images, skip=0)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        nest("resnet", calib=images)
    rdn = nested_toy()
    with pytest.raises(ValueError, match="subnet must satisfy"):
        rdn(images, subnet=rdn.num_subnets + 1)
    with pytest.raises(TypeError, match="subnet must be an int"):
        rdn(images, subnet=1.0)
    with pytest.raises(ValueError, match="subnet must satisfy"):
        rdn.macs(0)
    with pytest.raises(TypeError, match="state must be a StagedState"):
        rdn.step(images)


def test_surgery_leaves_every_module_in_its_mode(images):
    """Surgery runs the base model in eval mode and gives every sub-module its own mode back."""
    model = toy().train()
    model.stem[1].eval()  # a frozen BN
    nest(model, k=3, calib=images, skip=["stem"], mac_budget=1.2, exact=False, compensate=True)
    assert model.training and model.body[1].training and not model.stem[1].training


def test_channel_coupled_op_stays_outside():
    """A softmax over channels is not per channel: its inputs stay un-nested, the later conv is nested."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1),
        nn.Softmax(dim=1),
        nn.Conv2d(8, 8, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    rdn = nest(model, k=2, calib=torch.randn(2, 3, 6, 6), skip=0)
    assert isinstance(rdn.layers["_2"], NestedConv2d)
    assert not isinstance(rdn.layers["_0"], NestedConv2d)


def test_depth_split_doubles_the_exits(images):
    """Depth-wise nesting: a shallow exit per width after body.2; one pass, separate passes, staged walk, export."""
    rdn = nested_toy(depth_split="body.2")
    assert rdn.num_groups == 5 and rdn.num_subnets == 10
    assert rdn.exits[:3] == [(1, 0), (1, 1), (2, 0)]
    with torch.no_grad():
        logits = rdn(images)
        assert len(logits) == 10
        for subnet, state in staged_states(rdn, images):
            assert state.subnet == subnet
            alone = rdn(images, subnet=subnet)
            torch.testing.assert_close(alone, logits[subnet - 1], atol=ATOL, rtol=ATOL)
            torch.testing.assert_close(state.logits, alone, atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(rdn.export(3).eval()(images), rdn(images, subnet=3), atol=ATOL, rtol=ATOL)
    assert_earlier_subnets_ignore_later_groups(rdn, images)  # shallow exits included
    rebuilt = RussianDollNet.from_config(rdn.rdn_config, model=toy())
    rebuilt.load_state_dict(rdn.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(images, subnet=5), rdn(images, subnet=5))


def test_depth_split_hand_counted_costs():
    """Split after the BN of conv1 (8 channels at 8×8), k=2 truncate: the shallow head is a 1×1 conv to 6.

    Exits: 1 = (N_1, shallow), 2 = N_1, 3 = (N_2, shallow), 4 = N_2.
    """
    rdn = nest(hand_count_net(), k=2, mode="truncate", calib=torch.randn(2, 3, 8, 8), skip=["0"], depth_split="3")
    assert rdn.exits == [(1, 0), (1, 1), (2, 0), (2, 1)]
    stem = 4 * 3 * 9 * 64
    assert rdn.macs(1) == stem + 4 * 4 * 64 + 4 * 6 * 64 + 6 * 5
    assert rdn.macs(3) == stem + 8 * 4 * 64 + 8 * 6 * 64 + 6 * 5
    assert rdn.macs(2) == stem + 4 * 4 * 64 + 3 * 4 * 64 + 3 * 5  # full-depth head folded: 3 → 5
    assert rdn.params(1) == (4 * 3 * 9 + 4) + 4 * 4 + 2 * 4 + (4 * 6 + 2 * 6) + (6 * 5 + 5)
    with pytest.raises(ValueError, match="subnet must satisfy 1 <= subnet <= 4"):
        rdn.macs(5)


def test_squeeze_excite_and_in_place_activations(images):
    """In-place non-idempotent activations are recognised as per channel; the SE gate's conv writes x's space."""
    model = squeeze_excite_net()
    rdn = nest(model, k=2, calib=images, skip=["0"], exact=True).eval()
    nested = [name for name, layer in rdn.layers.items() if isinstance(layer, NestedConv2d)]
    assert len(nested) == 4  # conv 8→16, SE reduce, SE expand, conv 16→12
    with torch.no_grad():
        logits = rdn(images)
        assert relative_error(logits[-1], model(images)) < 1e-5
        for s, one_pass in enumerate(logits, start=1):
            torch.testing.assert_close(rdn(images, subnet=s), one_pass, atol=ATOL, rtol=ATOL)


def test_per_channel_modules_with_their_own_tensors(images):
    """A fused BN + activation and a learned channel scale are sliced per channel; "sum" needs to know
    which tensors are offsets, so it accepts only BatchNorm."""
    model = fused_norm_net()
    rdn = nest(model, k=2, calib=images, skip=["0"], exact=True).eval()
    assert rdn.params(3) > rdn.params(1)
    with torch.no_grad():
        logits = rdn(images)
        assert relative_error(logits[-1], model(images)) < 1e-5
        for s, state in staged_states(rdn, images):
            torch.testing.assert_close(rdn(images, subnet=s), logits[s - 1], atol=ATOL, rtol=ATOL)
            torch.testing.assert_close(state.logits, logits[s - 1], atol=ATOL, rtol=ATOL)
            torch.testing.assert_close(rdn.export(s).eval()(images), logits[s - 1], atol=ATOL, rtol=ATOL)
    with pytest.raises(ValueError, match="ChannelScale .* use copies='latest'"):
        nest(model, k=2, calib=images, skip=["0"], copies="sum")


def test_shared_weights_are_refused(images):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.conv, self.fc = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Linear(8, 3)

        def forward(self, x):
            x = self.conv(self.conv(self.stem(x)))
            return self.fc(x.mean((2, 3)))

    with pytest.raises(ValueError, match="'conv' is called twice"):
        nest(Twice(), k=2, calib=images, skip=0)


def test_one_pass_keeps_in_place_activations_off_views(images):
    """Full-width values are used as they are: an in-place ReLU on a slice view would make autograd
    rebase the view (CopySlices + AsStridedBackward, a whole-tensor copy per layer in the backward)."""
    rdn = nested_toy(functools.partial(nn.ReLU, inplace=True)).train()
    logits = rdn(images)
    kinds, stack, seen = set(), [sum(out.sum() for out in logits).grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kinds.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    assert "ReluBackward0" in kinds or "ThresholdBackward0" in kinds
    assert not kinds & {"CopySlices", "AsStridedBackward0"}, kinds


def test_the_graph_probes_a_model_on_its_own_device():
    """The per-channel probes of the graph analysis (is this module per channel? a LayerNorm over
    channels?) run on the device of the model and its example, not on the CPU: on a CUDA model
    they raised a device mismatch, every BatchNorm counted as opaque and nest() refused the model.
    The meta device stands in for CUDA here: the analysis then gets past every probe of a module
    and stops only where it must read a value (``.item()``), which meta tensors do not have."""
    model = create("mobilenet_v2", num_classes=10, input_size=32, width_mult=0.25).eval().to("meta")
    with pytest.raises(RuntimeError, match=r"item\(\) cannot be called on meta tensors"):
        SurgeryGraph(model, torch.randn(2, 3, 32, 32, device="meta"), skip=(), k=4, mode="expand", exact=True)
