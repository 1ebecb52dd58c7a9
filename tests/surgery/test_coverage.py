"""Coverage of model code surgery did not see written: tails after the classifier, channel splits,
concatenations, the coverage report and the default skip (hand-written models; timm / torchvision in
test_zoo.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from rdn.models.profile import count_params, profile_model
from rdn.surgery import CoverageWarning, RussianDollNet, nest
from tests.surgery.checks import assert_earlier_subnets_ignore_later_groups, assert_paths_agree, relative_error
from tests.surgery.toys import randomize_batch_norm


def _images(n: int = 4, size: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class SplitNet(nn.Module):
    """A block that splits its channels into fixed-size parts (``torch.split`` / ``chunk`` / slices)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.project = nn.Conv2d(8, 12, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.expand(self.stem(x))
        if self.how == "split":
            a, b = torch.split(x, [8, 8], dim=1)
        elif self.how == "chunk":
            a, b = x.chunk(2, dim=1)
        else:
            a, b = x[:, :8], x[:, 8:]
        return self.fc(torch.flatten(self.pool(self.project(self.branch(a) + b)), 1))


@pytest.mark.parametrize("how", ["split", "chunk", "slice"])
def test_a_model_that_splits_channels_is_never_accepted_and_then_crashes(how):
    """Nested then crashed at the first sub-network forward (split_with_sizes expects split_sizes to sum
    exactly to ...): the split must either be nested or kept in the un-nested part, and the RDN must run."""
    torch.manual_seed(0)
    model = randomize_batch_norm(SplitNet(how), torch.Generator().manual_seed(0))
    images = _images()
    try:
        net = nest(model, k=2, calib=images, skip=["stem"]).eval()
    except ValueError as error:  # refused: the message names the split
        assert "split" in str(error) or "chunk" in str(error) or "getitem" in str(error), error
        return
    assert_paths_agree(net, images, export=True)
    assert_earlier_subnets_ignore_later_groups(net, images)
    with torch.no_grad():
        assert relative_error(net(images)[-1], model(images)) < 1e-5


# ----------------------------------------------------------------------------------------------
# Concatenations
# ----------------------------------------------------------------------------------------------


class Ghost(nn.Module):
    """GhostNet's module: half the channels from a 1×1 conv, half from a depthwise conv of those."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        half = outputs // 2
        self.primary = nn.Sequential(nn.Conv2d(inputs, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())
        self.cheap = nn.Sequential(
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False), nn.BatchNorm2d(half), nn.ReLU()
        )

    def forward(self, x):
        primary = self.primary(x)
        return torch.cat([primary, self.cheap(primary)], dim=1)


class GhostBlock(nn.Module):
    """ghost → depthwise → SE gate (its last conv writes the concatenation) → ghost, + shortcut."""

    def __init__(self, channels: int, hidden: int, outputs: int) -> None:
        super().__init__()
        self.ghost1 = Ghost(channels, hidden)
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden), nn.BatchNorm2d(hidden))
        self.reduce, self.expand = nn.Conv2d(hidden, 4, 1), nn.Conv2d(4, hidden, 1)
        self.ghost2 = Ghost(hidden, outputs)
        self.shortcut = (
            nn.Identity()
            if channels == outputs
            else nn.Sequential(nn.Conv2d(channels, outputs, 1), nn.BatchNorm2d(outputs))
        )

    def forward(self, x):
        y = self.dw(self.ghost1(x))
        y = y * torch.sigmoid(self.expand(torch.relu(self.reduce(y.mean((2, 3), keepdim=True)))))
        return self.ghost2(y) + self.shortcut(x)


class GhostToy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(
            Ghost(8, 16), GhostBlock(16, 24, 16), GhostBlock(16, 32, 16), GhostBlock(16, 24, 24)
        )
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class DenseLayer(nn.Module):
    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, 8, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        return self.conv2(torch.relu(self.norm2(self.conv1(torch.relu(self.norm(x))))))


class DenseToy(nn.Module):
    """DenseNet-style: every layer reads the concatenation of the stem output and all earlier layers'."""

    def __init__(self, growth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layers = nn.ModuleList(DenseLayer(8 + i * growth, growth) for i in range(3))
        self.norm = nn.BatchNorm2d(8 + 3 * growth)
        self.transition = nn.Conv2d(8 + 3 * growth, 12, 1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(features))
        x = self.transition(torch.relu(self.norm(torch.cat(features, 1))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class PooledBranches(nn.Module):
    """Two branches pooled differently and concatenated into the classifier's features."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.a = nn.Sequential(nn.Conv2d(8, 12, 1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(18, 5)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(torch.cat([self.a(x).mean((2, 3)), self.b(x).amax((2, 3))], 1))


CONCAT_MODELS = {"ghost": GhostToy, "dense": DenseToy, "pooled": PooledBranches}
# (mode, exact, copies): exact latest copies reproduce the base in N_K
VARIANTS = [("expand", True, "latest"), ("expand", False, "sum"), ("truncate", True, "latest")]


def _concat_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batch_norm(CONCAT_MODELS[name](), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(CONCAT_MODELS))
@pytest.mark.parametrize("mode, exact, copies", VARIANTS)
def test_concatenations_nest_with_every_property(name, mode, exact, copies):
    """P1 (later groups never change earlier exits, through every path), P2 (one pass = K passes =
    staged), P5 (export) and, for exact latest copies, P3 (N_K is the base) on concatenating models."""
    model, images = _concat_model(name), _images(seed=1)
    budget = {"mac_budget": None} if mode == "expand" and not exact else {}  # every copy and block
    net = nest(model, k=3, mode=mode, exact=exact, copies=copies, calib=_images(8), skip=["stem"], **budget).eval()
    concatenations = [step for step in net.plan.steps if step.role.value == "concat"]
    assert concatenations, "the concatenations were not nested"
    assert_paths_agree(net, images, export=True)
    assert_earlier_subnets_ignore_later_groups(net, images)
    if (mode, exact, copies) == ("expand", True, "latest"):
        with torch.no_grad():
            assert relative_error(net(images)[-1], model(images)) < 1e-5


def test_every_prefix_of_a_concatenation_is_its_parts_prefixes():
    """Group q of a concatenation holds every part's group q: the first s groups are the parts' first s."""
    net = nest(_concat_model("dense"), k=3, calib=_images(8), skip=["stem"])
    step = next(step for step in net.plan.steps if step.role.value == "concat" and len(step.space.parts) == 4)
    space, starts = step.space, [0, 8, 12, 16]
    for s in range(1, net.num_groups + 1):
        prefix = space.source[: space.offsets[s]].tolist()
        expected = [
            start + c
            for start, part in zip(starts, space.parts, strict=True)
            for c in part.source[: part.offsets[s]].tolist()
        ]
        assert sorted(prefix) == sorted(expected)
    assert space.splits[0] > 8  # the un-nested stem output lies in group 0, beside the nested parts' first groups


def test_adding_concatenations_of_different_splits_stays_un_nested_and_is_named():
    class Mismatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
            self.c, self.d = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 12, 1)
            self.fc = nn.Linear(16, 5)

        def forward(self, x):
            x = self.stem(x)
            y = torch.cat([self.a(x), self.b(x)], 1) + torch.cat([self.c(x), self.d(x)], 1)
            return self.fc(y.mean((2, 3)))

    torch.manual_seed(0)
    with pytest.raises(
        ValueError, match=r"cat\(\) .*joins concatenations of different channel splits \[8, 8\], \[4, 12\]"
    ):
        nest(Mismatch().eval(), k=2, calib=_images(), skip=["stem"])


# ----------------------------------------------------------------------------------------------
# Coverage report and the default skip
# ----------------------------------------------------------------------------------------------


def small_cnn() -> nn.Module:
    """Three convs at 28×28 (never past output stride 2): the default skip used to skip all of them."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


@pytest.mark.parametrize("name", sorted(CONCAT_MODELS))
def test_coverage_counts_the_base_model(name):
    """The report's totals are the base model's: its conv / linear MACs (rdn.models.profile) and parameters."""
    model = _concat_model(name)
    net = nest(model, k=3, calib=_images(8), skip=["stem"])
    report = net.coverage()
    assert report.total_macs == profile_model(model, (1, 3, 12, 12)).macs
    assert report.total_params == count_params(model)
    stem = [layer for layer in report.layers if layer.module.startswith("stem")]
    assert stem and all(not layer.nested for layer in stem)
    assert {layer.why for layer in stem if layer.macs} == {"kept un-nested by skip"}  # the convs
    assert all(layer.why for layer in stem)  # and the norms beside them: un-nested because of the skip
    expected = 1 - sum(layer.macs for layer in stem) / report.total_macs
    assert report.mac_share == pytest.approx(expected)
    assert 0 < report.param_share < 1
    text = report.report()
    assert text.startswith("Coverage: ") and "| kept un-nested by skip | stem.0 |" in text


def test_default_skip_nests_a_small_input_model():
    """At most the first quarter of the nestable layers is skipped by default: a 3-conv CNN at 28×28 nests."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoverageWarning)
        net = nest(small_cnn(), k=2, calib=torch.randn(4, 1, 28, 28))
    assert [net.base_module_name(name) for name in net.nested_layers()] == ["0", "3", "7"]
    assert net.record.config.skip == ()


def test_little_nested_warns_and_names_the_causes():
    with pytest.warns(CoverageWarning, match=r"little of the model is nested: \d+ % .*kept un-nested by skip.*skip=0"):
        net = nest(small_cnn(), k=2, calib=torch.randn(4, 1, 28, 28), skip=2)
    assert net.coverage().mac_share < 0.5


def test_nothing_nested_suggests_skip_zero():
    with pytest.raises(ValueError, match=r"no nestable layer.*skip=0"):
        nest(small_cnn(), k=2, calib=torch.randn(4, 1, 28, 28), skip=3)


class TimmStyleHead(nn.Module):
    """timm's ClassifierHead: pool → dropout → fc → flatten (nn.Identity), then a reshape and a dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 1), nn.ReLU())
        self.drop, self.fc, self.flatten, self.after = nn.Dropout(0.2), nn.Linear(12, 5), nn.Identity(), nn.Dropout()

    def forward(self, x):
        x = self.fc(self.drop(self.features(x).mean((2, 3))))
        return self.after(self.flatten(x).reshape(x.size(0), -1))


def test_shape_only_modules_after_the_classifier_are_dropped_and_reported():
    torch.manual_seed(0)
    model = TimmStyleHead().eval()
    net = nest(model, k=2, calib=_images(), skip=0, exact=True).eval()
    assert net.plan.after_classifier == (
        "after (Dropout)",
        ".reshape() (node reshape)",
        "flatten (Identity)",
    )
    assert "Dropped after the classifier" in net.coverage().report()
    images = _images(seed=3)
    assert_paths_agree(net, images, export=True)
    with torch.no_grad():
        assert relative_error(net(images)[-1], model(images)) < 1e-5


def test_a_conv_classifier_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match=r"nn\.Linear classifier .*got 3 \(AdaptiveAvgPool2d\)"):
        nest(model.eval(), k=2, calib=_images())


# ----------------------------------------------------------------------------------------------
# Norms that couple channels: fixed (un-nested, the default) or grouped (statistics per group)
# ----------------------------------------------------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's LayerNorm over the channels of an (N, C, H, W) tensor."""

    def forward(self, x):
        x = nn.functional.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, channels: int, norm: type[nn.Module]) -> None:
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = norm(channels)
        self.pw1, self.act, self.pw2 = (
            nn.Conv2d(channels, 4 * channels, 1),
            nn.GELU(),
            nn.Conv2d(4 * channels, channels, 1),
        )

    def forward(self, x):
        return x + self.pw2(self.act(self.pw1(self.norm(self.dw(x)))))


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(4, channels)


class ConvNeXtToy(nn.Module):
    """patchify stem + LayerNorm2d → blocks → LayerNorm2d + 2×2 downsample → blocks → pool → LayerNorm → fc."""

    def __init__(self, in_channels: int = 3, classes: int = 5, width: int = 16, block_norm=LayerNorm2d) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 2, stride=2), LayerNorm2d(width))
        self.stage1 = nn.Sequential(ConvNeXtBlock(width, block_norm), ConvNeXtBlock(width, block_norm))
        self.down = nn.Sequential(LayerNorm2d(width), nn.Conv2d(width, 2 * width, 2, stride=2))
        self.stage2 = nn.Sequential(ConvNeXtBlock(2 * width, block_norm), ConvNeXtBlock(2 * width, block_norm))
        self.norm, self.fc = nn.LayerNorm(2 * width), nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(self.norm(x.mean((2, 3))))


def _convnext(block_norm=LayerNorm2d) -> nn.Module:
    torch.manual_seed(0)
    model = ConvNeXtToy(block_norm=block_norm)
    with torch.no_grad():  # non-trivial affine parameters
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def test_channel_norms_stay_un_nested_by_default_and_the_error_names_the_option():
    with pytest.raises(ValueError, match=r"no nestable layer") as error:
        nest(_convnext(), k=2, calib=_images(4, 16), skip=0)
    message = str(error.value)
    assert "stem.1 (LayerNorm2d) normalises over all its channels (LayerNorm over channels)" in message, message
    assert "norms='grouped'" in message, message


@pytest.mark.parametrize("block_norm", [LayerNorm2d, group_norm], ids=["layer_norm", "group_norm"])
@pytest.mark.parametrize("mode", ["expand", "truncate"])
def test_grouped_norms_nest_with_every_property(block_norm, mode):
    """norms='grouped': every LayerNorm / GroupNorm on a nested tensor becomes a GroupedNorm, and the RDN has
    P1 (bit-exact), P2, the staged path and the export."""
    model, images = _convnext(block_norm), _images(4, 16, seed=1)
    net = nest(model, k=3, mode=mode, exact=True, calib=_images(8, 16), skip=0, norms="grouped").eval()
    grouped = [step for step in net.plan.steps if step.role.value == "groupwise"]
    assert len(grouped) == 7  # the stem's, four blocks', the downsampling and the head's
    assert net.record.config.norms == "grouped"
    assert net.coverage().mac_share > 0.8
    assert_paths_agree(net, images, export=True)
    assert_earlier_subnets_ignore_later_groups(net, images)
    with torch.no_grad():
        errors = [relative_error(logits, model(images)) for logits in net(images)]
    # Per-group statistics are another function than the base's, except in expand's exact N_K here: its
    # last group holds the latest copy of every channel of these tensors, so its statistics are the base's.
    assert min(errors[:-1]) > 1e-2
    assert (errors[-1] < 1e-5) if mode == "expand" else (errors[-1] > 1e-2)


def test_a_grouped_norm_with_one_group_is_the_base_norm_and_groups_are_independent():
    from rdn.nn import GroupedNorm

    x = torch.randn(2, 12, 5, 5, generator=torch.Generator().manual_seed(0))
    weight, bias = torch.linspace(0.5, 1.5, 12), torch.linspace(-1, 1, 12)
    layer_norm = LayerNorm2d(12)
    with torch.no_grad():
        layer_norm.weight.copy_(weight)
        layer_norm.bias.copy_(bias)
    torch.testing.assert_close(GroupedNorm((12,), False, 1e-5, weight, bias)(x), layer_norm(x))
    group = nn.functional.group_norm(x, 1, weight, bias, 1e-5)
    torch.testing.assert_close(GroupedNorm((12,), True, 1e-5, weight, bias)(x), group)
    for spatial in (False, True):
        norm = GroupedNorm((4, 0, 8), spatial, 1e-5, weight, bias)
        full = norm(x)
        changed = x.clone()
        changed[:, 4:] = torch.randn(2, 8, 5, 5)
        assert torch.equal(norm(changed)[:, :4], full[:, :4])  # later channels never change earlier groups
        assert torch.equal(norm(x[:, :4]), full[:, :4])  # a prefix of whole groups
        torch.testing.assert_close(norm(x[:, 4:], groups=(1, 3)), full[:, 4:])  # a stage's groups
        torch.testing.assert_close(norm.prefix(1)(x[:, :4]), full[:, :4])


def test_a_grouped_norm_keeps_the_base_group_norms_groups():
    """With the base GroupNorm's group of every channel, a nesting group holding all channels (in any order)
    computes that GroupNorm exactly; earlier nesting groups take statistics per base group they hold."""
    from rdn.nn import GroupedNorm

    x = torch.randn(2, 12, 4, 4, generator=torch.Generator().manual_seed(0))
    weight, bias = torch.linspace(0.5, 1.5, 12), torch.linspace(-1, 1, 12)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    expected = nn.functional.group_norm(x, 3, weight, bias, 1e-5)[:, order]
    norm = GroupedNorm((12,), True, 1e-5, weight[order], bias[order], order // 4)
    torch.testing.assert_close(norm(x[:, order]), expected)
    split = GroupedNorm((5, 7), True, 1e-5, weight[order], bias[order], order // 4)
    first = x[:, order[:5]]
    ids = order[:5] // 4
    for base_group in ids.unique():  # every base group's channels in the first nesting group, on their own
        members = (ids == base_group).nonzero().flatten()
        alone = nn.functional.group_norm(first[:, members], 1, weight[order[:5]][members], bias[order[:5]][members])
        torch.testing.assert_close(split(x[:, order])[:, members], alone)


def test_a_grouped_norm_network_rebuilds_from_its_record():
    model, images = _convnext(), _images(4, 16, seed=1)
    net = nest(model, k=2, calib=_images(8, 16), skip=0, norms="grouped").eval()
    for config in (net.record, net.rdn_config):
        rebuilt = RussianDollNet.from_config(config, model=_convnext())
        rebuilt.load_state_dict(net.state_dict())
        rebuilt.eval()
        with torch.no_grad():
            assert torch.equal(rebuilt(images, subnet=2), net(images, subnet=2))


@pytest.mark.parametrize(
    "settings",
    [
        dict(exact=False, mac_budget=1.4, copy_fraction=1.0),
        dict(exact=False, copy_fraction=0.5, compensate=True),
        dict(depth_split="blocks.2", select="random", mac_budget=None),
    ],
    ids=["mac_budget", "compensate", "depth_split"],
)
def test_concatenations_work_with_every_pass(settings):
    """The budget, compensation and depth-split passes see concatenations as any other space."""
    images = _images(4, seed=5)
    net = nest(_concat_model("ghost"), k=3, calib=_images(8), skip=["stem"], **settings).eval()
    assert_paths_agree(net, images, export=True)
    assert_earlier_subnets_ignore_later_groups(net, images)


def test_the_causes_account_for_every_un_nested_mac():
    net = nest(_concat_model("ghost"), k=3, calib=_images(8), skip=["stem", "blocks.1"])
    report = net.coverage()
    assert sum(macs for _, macs, _ in report.causes()) == report.total_macs - report.nested_macs
    skipped = dict((why, modules) for why, _, modules in report.causes())["kept un-nested by skip"]
    assert "blocks.1.ghost1.primary.0" in skipped  # a skipped layer
    # the depthwise convs beside the skipped layers are un-nested because of them
    beside = [layer for layer in report.layers if layer.module == "blocks.1.dw.0"]
    assert beside and not beside[0].nested and "blocks.1." in beside[0].why


# ----------------------------------------------------------------------------------------------
# Tensors a block's forward reads itself (fx get_attr): one value per channel nests, anything else not
# ----------------------------------------------------------------------------------------------


class LayerScaleBlock(nn.Module):
    """A residual block that reads tensors of its own beside its layers': timm's layer scale
    ``x.mul(gamma.reshape(1, -1, 1, 1))`` or torchvision's ``(C, 1, 1) * x``, then a per-channel shift (a buffer)."""

    def __init__(self, channels: int, style: str) -> None:
        super().__init__()
        self.style = style
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU())
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.gamma = nn.Parameter(torch.rand((channels,) if style == "timm" else (channels, 1, 1)) + 0.5)
        self.register_buffer("shift", torch.randn(1, channels, 1, 1))

    def forward(self, x):
        y = self.dw(self.conv(x))
        y = y.mul(self.gamma.reshape(1, -1, 1, 1)) if self.style == "timm" else self.gamma * y
        return x + (y - self.shift)


class LayerScaleNet(nn.Module):
    """stem → 1×1 conv → two layer-scale blocks → pool → a per-channel scale of the model's own → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 1), nn.BatchNorm2d(12))
        self.blocks = nn.Sequential(LayerScaleBlock(12, "timm"), LayerScaleBlock(12, "torchvision"))
        self.scale = nn.Parameter(torch.rand(12) + 0.5)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)) * self.scale)


@pytest.mark.parametrize("mode, exact, copies", VARIANTS)
def test_per_channel_tensors_read_by_forward_nest_with_every_property(mode, exact, copies):
    """A layer scale (and a shift) read by a block's own forward is a per-channel step, sliced and copied
    as BN is: P1, P2, staged, export and, for exact latest copies, N_K = the base."""
    torch.manual_seed(0)
    model = randomize_batch_norm(LayerScaleNet(), torch.Generator().manual_seed(0)).eval()
    images = _images(seed=1)
    net = nest(model, k=3, mode=mode, exact=exact, copies=copies, calib=_images(8), skip=["stem.0"]).eval()
    folded = {net.base_module_name(step.name) for step in net.plan.steps if step.role.value == "channel_params"}
    tensors = {"blocks.0.gamma", "blocks.0.shift", "blocks.1.gamma", "blocks.1.shift", "scale"}
    assert tensors <= folded, folded
    assert [layer.module for layer in net.coverage().layers if not layer.nested] == ["stem.0"]  # the skipped conv
    assert_paths_agree(net, images, export=True)
    assert_earlier_subnets_ignore_later_groups(net, images)
    if (mode, exact, copies) == ("expand", True, "latest"):
        with torch.no_grad():
            assert relative_error(net(images)[-1], model(images)) < 1e-5
    # the base model keeps its tensors (the surgery folds them in its traced copy), and rebuilds the RDN
    assert model.blocks[1].gamma.shape == (12, 1, 1) and model.blocks[0].shift.shape == (1, 12, 1, 1)
    rebuilt = RussianDollNet.from_config(net.record, model=model)
    rebuilt.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(images, subnet=2), net(images, subnet=2))


class PositionBlock(nn.Module):
    """A block that adds a parameter of one value per position and channel: not one value per channel."""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.pos = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, x):
        return self.conv(x) + self.pos


def test_a_tensor_read_by_forward_that_is_not_per_channel_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), PositionBlock(8, 6), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5)).eval()  # fmt: skip
    with pytest.raises(ValueError, match="no nestable layer") as error:
        nest(model, k=2, calib=_images(4, 6), skip=0)
    message = str(error.value)
    assert (
        "1 (PositionBlock) has parameters or buffers that are not one value per channel (its forward reads its "
        "parameter 'pos' of shape (1, 8, 6, 6), which add() in 1 (node add) applies as shape (1, 8, 6, 6) to a "
        "tensor of shape (1, 8, 6, 6): not one value per channel)"
    ) in message, message

    class OwnTensor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 5)
            self.mix = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)) @ self.mix)

    with pytest.raises(ValueError, match=r"forward reads the parameter 'mix' of shape \(8, 8\), which matmul\(\)"):
        nest(OwnTensor().eval(), k=2, calib=_images(), skip=0)


def test_sum_copies_scale_every_copy_and_shift_the_primary_only():
    """copies='sum' (copies add up to the base value): a folded scale applies to every copy, a shift to the
    primary copy only, so a block without non-linearities keeps N_K the base."""
    torch.manual_seed(0)
    model = LayerScaleNet()
    for block in model.blocks:
        block.conv[2] = nn.Identity()
    model = randomize_batch_norm(model, torch.Generator().manual_seed(0)).eval()
    net = nest(model, k=3, exact=True, copies="sum", calib=_images(8), skip=["stem.0"]).eval()
    images = _images(seed=2)
    with torch.no_grad():
        assert relative_error(net(images)[-1], model(images)) < 1e-5
