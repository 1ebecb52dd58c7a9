"""Small hand-built base models for the surgery tests."""

from __future__ import annotations

import torch
from torch import nn


class InvertedResidual(nn.Module):
    """1×1 expand → BN → act → 3×3 depthwise → BN → act → 1×1 project → BN, + identity."""

    def __init__(self, channels: int, hidden: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            act(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            act(),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x):
        return x + self.conv(x)


class ToyNet(nn.Module):
    """stem (skipped) → 1×1 conv → two inverted residual blocks → 1×1 head conv → pool → linear."""

    def __init__(self, act: type[nn.Module] = nn.ReLU, width: int = 12, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act())
        self.body = nn.Sequential(
            nn.Conv2d(8, width, 1),
            nn.BatchNorm2d(width),
            InvertedResidual(width, 2 * width, act),
            InvertedResidual(width, 2 * width - 4, act),
            nn.Conv2d(width, 16, 1),
            nn.BatchNorm2d(16),
            act(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.body(self.stem(x))), 1))


def hand_count_net() -> nn.Module:
    """3→4 3×3 stem (skipped) → 1×1 4→8 → BN → ReLU → 1×1 8→6 → pool → flatten → linear 6→5."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 8, 1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 1, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )


@torch.no_grad()
def randomize_batch_norm(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so BN inflation is exercised (eval mode)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(torch.rand(channels, generator=generator) * 2 - 1)
            module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.bias.copy_(torch.rand(channels, generator=generator) * 2 - 1)
    return model.eval()


def toy(act: type[nn.Module] = nn.ReLU, seed: int = 0, **kwargs) -> ToyNet:
    torch.manual_seed(seed)
    return randomize_batch_norm(ToyNet(act, **kwargs), torch.Generator().manual_seed(seed))


class SqueezeExcite(nn.Module):
    """x * hardsigmoid(conv(relu(conv(pool(x))))): the gate's last conv must write x's channel space."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Hardsigmoid(inplace=True)

    def forward(self, x):
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


def squeeze_excite_net() -> nn.Module:
    """MobileNetV3-like: in-place Hardswish / SiLU (not idempotent) and an SE gate inside the nested part."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Hardswish(inplace=True),
        nn.Conv2d(8, 16, 1),
        nn.BatchNorm2d(16),
        nn.SiLU(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        SqueezeExcite(16, 4),
        nn.Conv2d(16, 12, 1),
        nn.Hardswish(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 5),
    )
    return randomize_batch_norm(model, torch.Generator().manual_seed(0))


class BatchNormAct(nn.BatchNorm2d):
    """timm-style fused BN + activation: reads its own tensors through ``F.batch_norm``."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.Hardswish()

    def forward(self, x):
        statistics = (None, None) if self.training else (self.running_mean, self.running_var)
        x = nn.functional.batch_norm(x, *statistics, self.weight, self.bias, self.training, 0.1, self.eps)
        return self.act(x)


class ChannelScale(nn.Module):
    """A learned per-channel scale (layer-scale style): per-channel tensors of unknown role."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1)


def fused_norm_net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 16, 1),
        BatchNormAct(16),
        nn.Conv2d(16, 12, 1),
        ChannelScale(12),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 5),
    )
    return randomize_batch_norm(model, torch.Generator().manual_seed(0))
