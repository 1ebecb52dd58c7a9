"""MAC and parameter counting against hand counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rdn.models import count_params, profile_model
from rdn.models.profile import run_with_forward_hooks
from rdn.nn import NestedConv2d, NestedLinear


class _ToyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.grouped(torch.relu(self.bn(self.conv(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_toy_net_hand_counts():
    profile = profile_model(_ToyNet(), (2, 3, 16, 16))
    # conv: 2·8·8·8 outputs × 3·3·3; grouped: same outputs × (8/4)·3·3; fc: 2·5 outputs × 8.
    assert profile.layer_macs == {"conv": 1024 * 27, "grouped": 1024 * 18, "fc": 80}
    assert profile.macs == 1024 * 27 + 1024 * 18 + 80
    assert profile.params == (8 * 27 + 8) + 16 + 8 * 18 + (5 * 8 + 5)
    assert profile.params == count_params(_ToyNet())


class _NestedNet(nn.Module):
    def __init__(self, stages) -> None:
        super().__init__()
        self.conv = NestedConv2d((2, 2), (3, 1), 3, padding=1)
        self.fc = NestedLinear((3, 1), (2, 2))
        self.stages = stages

    def forward(self, x):
        if self.stages is None:
            return self.fc(self.conv(x).mean(dim=(2, 3)))
        buffer = torch.zeros(x.shape[0], 4, *x.shape[2:])
        features = self.conv(x, stages=self.stages, out=buffer)
        return self.fc(features.mean(dim=(2, 3)), self.stages)


def test_nested_layers_count_only_the_computed_blocks():
    # Full triangle: conv per pixel 3·2 + 1·(2+2) = 10, × 3·3 × 25 pixels; fc 2·3 + 2·(3+1) = 14.
    full = profile_model(_NestedNet(None), (1, 4, 5, 5))
    assert full.layer_macs == {"conv": 10 * 9 * 25, "fc": 14}
    # Stage (1, 2) only: conv group 1 reads both input groups (1·4), fc group 1 reads 3 + 1 (2·4).
    second = profile_model(_NestedNet((1, 2)), (1, 4, 5, 5))
    assert second.layer_macs == {"conv": 4 * 9 * 25, "fc": 8}


def test_every_module_gets_its_own_mode_back():
    """Profiling runs in eval mode; a BN frozen in eval mode inside a training model stays frozen."""
    model = _ToyNet().train()
    model.bn.eval()
    profile_model(model, (1, 3, 16, 16))
    assert model.training and model.conv.training and not model.bn.training
    with pytest.raises(RuntimeError, match="hook failed"):
        run_with_forward_hooks(model, torch.zeros(1, 3, 16, 16), [(model.fc, _fail)])
    assert model.training and model.conv.training and not model.bn.training


def _fail(module, args, output):
    raise RuntimeError("hook failed")
