"""Base models: structure, shapes of both variants, published sizes, factory errors, building blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rdn.models import (
    InvertedResidual,
    ResNeXtBottleneck,
    SandglassBlock,
    create,
    list_models,
    make_divisible,
    profile_model,
)
from rdn.models.layers import TFSamePad2d

MODELS = ["efficientnet_lite0", "mobilenet_v2", "mobilenext", "resnext50_32x4d", "resnext_small"]


def build_on_meta(name: str, **kwargs) -> nn.Module:
    # Shapes and counts only: no memory, no arithmetic.
    with torch.device("meta"):
        return create(name, **kwargs)


def final_feature_map(model: nn.Module, input_size: int, in_chans: int = 3) -> torch.Size:
    x = torch.zeros(1, in_chans, input_size, input_size, device=next(model.parameters()).device)
    with torch.no_grad():
        return model.head(model.blocks(model.stem(x))).shape


def test_list_models():
    assert list_models() == MODELS


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("input_size, in_chans", [(28, 1), (96, 3)])
def test_forward_shapes_and_uniform_structure(name, input_size, in_chans):
    torch.manual_seed(0)
    model = create(name, num_classes=7, input_size=input_size, in_chans=in_chans, width_mult=0.25).eval()
    assert isinstance(model.blocks, nn.Sequential) and len(model.blocks) > 3
    for part in ("stem", "head", "pool", "classifier"):
        assert isinstance(getattr(model, part), nn.Module)
    assert isinstance(model.classifier, (nn.Linear, nn.Sequential))
    x = torch.randn(2, in_chans, input_size, input_size)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    assert features.shape == (2, model.num_features)
    assert logits.shape == (2, 7)
    torch.testing.assert_close(logits, model.classifier(features))
    # The small-input variant keeps a final map of at least 2×2 for 28×28 inputs.
    assert min(final_feature_map(model, input_size, in_chans)[2:]) >= 2


@pytest.mark.parametrize(
    "name, imagenet_map, small_map",
    [
        ("mobilenet_v2", 7, 4),
        ("mobilenext", 7, 4),
        ("efficientnet_lite0", 7, 4),
        ("resnext50_32x4d", 7, 4),
        ("resnext_small", 14, 8),
    ],
)
def test_total_stride_of_each_variant(name, imagenet_map, small_map):
    assert final_feature_map(build_on_meta(name, input_size=224), 224)[2] == imagenet_map
    assert final_feature_map(build_on_meta(name, input_size=32), 32)[2] == small_map


@pytest.mark.parametrize(
    "name, params, macs",
    [
        # Published: MobileNetV2 1.0 3.5M / 300M (Sandler et al.); EfficientNet-Lite0 4.65M / 385M
        # (TF Lite model card); MobileNeXt 1.0 3.5M / ~300M (3.54M / 317M in the RDN paper's
        # Table 1); ResNeXt-50 32×4d 25.0M / 4.23G (torchvision).
        ("mobilenet_v2", 3.50e6, 300e6),
        ("efficientnet_lite0", 4.65e6, 385e6),
        ("mobilenext", 3.54e6, 317e6),
        ("resnext50_32x4d", 25.03e6, 4.23e9),
    ],
)
def test_imagenet_sizes_match_published(name, params, macs):
    profile = profile_model(build_on_meta(name), (1, 3, 224, 224))
    assert profile.params == pytest.approx(params, rel=0.02)
    assert profile.macs == pytest.approx(macs, rel=0.04)


def test_width_mult_scales_and_rounds_channels():
    wide = build_on_meta("mobilenet_v2", width_mult=1.4)
    narrow = build_on_meta("mobilenet_v2", width_mult=0.35)
    assert wide.num_features == 1792 and narrow.num_features == 1280
    convs = [m for m in narrow.modules() if isinstance(m, nn.Conv2d)]
    assert all(conv.out_channels % 8 == 0 for conv in convs)
    assert make_divisible(32 * 0.35) == 16  # 11.2 rounds to 8, more than 10% down: bumped to 16
    assert make_divisible(96 * 1.4) == 136
    # EfficientNet-Lite keeps its stem and head fixed.
    lite = build_on_meta("efficientnet_lite0", width_mult=0.5)
    assert lite.stem.conv.out_channels == 32 and lite.num_features == 1280


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "resnet50"}, "known models: efficientnet_lite0, mobilenet_v2"),
        ({"name": "mobilenet_v2", "pretrained": True}, "only for \\['efficientnet_lite0'\\]"),
        ({"name": "efficientnet_lite0", "pretrained": True, "num_classes": 10}, "exists only for"),
        ({"name": "efficientnet_lite0", "pretrained": True, "input_size": 32}, "ImageNet variant"),
        ({"name": "mobilenext", "width_mult": 0}, "width_mult"),
        ({"name": "mobilenext", "in_chans": 0}, "in_chans"),
        ({"name": "mobilenext", "num_classes": 0}, "num_classes"),
        ({"name": "mobilenext", "input_size": 8}, "input_size"),
    ],
)
def test_factory_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create(**kwargs)


def test_blocks_residual_rules_and_layer_kinds():
    block = InvertedResidual(16, 16, 1, 6)
    assert block.use_residual and list(block.conv) == [block.conv.expand, block.conv.depthwise, block.conv.project]
    assert block.conv.depthwise.conv.groups == 96 and block.conv.project.conv.groups == 1
    assert not InvertedResidual(16, 24, 1, 6).use_residual and not InvertedResidual(16, 16, 2, 6).use_residual
    assert not hasattr(InvertedResidual(16, 16, 1, 1).conv, "expand")

    sandglass = SandglassBlock(96, 96, 1, 6)
    names = [name for name, _ in sandglass.conv.named_children()]
    assert names == ["depthwise_in", "reduce", "expand", "depthwise_out"] and sandglass.use_residual
    assert sandglass.conv.reduce.conv.out_channels == 16  # 96 / 6, at least 96 / 6
    assert [n for n, _ in SandglassBlock(288, 384, 1, 6).conv.named_children()] == ["reduce", "expand"]
    assert SandglassBlock(960, 1280, 1, 6).conv.reduce.conv.out_channels == 208  # ceil(1280/6) to 16s

    bottleneck = ResNeXtBottleneck(64, 128, 256, 2, 32)
    assert bottleneck.conv.grouped.conv.groups == 32 and isinstance(bottleneck.shortcut, nn.Sequential)
    assert isinstance(ResNeXtBottleneck(256, 128, 256, 1, 32).shortcut, nn.Identity)
    with pytest.raises(ValueError, match="multiple of the cardinality"):
        ResNeXtBottleneck(64, 100, 256, 1, 32)


def test_residual_forward_adds_the_input():
    torch.manual_seed(0)
    block = SandglassBlock(16, 16, 1, 2).eval()
    x = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(block(x), x + block.conv(x))
    bottleneck = ResNeXtBottleneck(16, 16, 16, 1, 4).eval()
    torch.testing.assert_close(bottleneck(x), torch.relu(x + bottleneck.conv(x)))


def test_tf_same_padding():
    pad = TFSamePad2d(3, 2)
    assert pad(torch.zeros(1, 1, 224, 224)).shape[2:] == (225, 225)  # one extra row/column at the end
    x = torch.arange(16.0).view(1, 1, 4, 4)
    padded = pad(x)
    assert torch.equal(padded[..., :4, :4], x) and (padded[..., 4, :] == 0).all()
    assert pad(torch.zeros(1, 1, 7, 7)).shape[2:] == (9, 9)  # odd size: symmetric
    conv = nn.Conv2d(1, 1, 5, 2)
    assert conv(TFSamePad2d(5, 2)(torch.zeros(1, 1, 15, 16))).shape[2:] == (8, 8)  # ceil(size / 2)
