"""Coverage of model code surgery did not see written: tails after the classifier, channel splits,
concatenations, the coverage report and the default skip (hand-written models; timm / torchvision in
test_zoo.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from rdn.models.profile import count_params, profile_model
from rdn.surgery import CoverageWarning, nest
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


CONCAT_MODELS = {"ghost": GhostToy, "dense": DenseToy}
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
    net = nest(model, k=3, mode=mode, exact=exact, copies=copies, calib=_images(8), skip=["stem"]).eval()
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
    assert {layer.why for layer in stem if layer.why} == {"kept un-nested by skip"}
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
    net = nest(model, k=2, calib=_images(), skip=0).eval()
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
