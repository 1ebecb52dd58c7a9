"""Inputs surgery cannot use are refused with an error that names them and says what was expected."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from rdn.surgery import nest


def _layer_norm_head(convs: int = 1) -> nn.Module:
    """Conv → BN → ReLU (× ``convs``) → pool → flatten → LayerNorm → Linear: the LayerNorm couples
    every channel of the features, so none of the convs can be nested."""
    layers, channels = [], 3
    for _ in range(convs):
        layers += [nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
        channels = 8
    head = nn.Sequential(OrderedDict(norm=nn.LayerNorm(8), fc=nn.Linear(8, 5)))
    parts = OrderedDict(features=nn.Sequential(*layers), pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), head=head)
    return nn.Sequential(parts).eval()


def test_a_channel_coupling_module_that_stops_the_nesting_is_named():
    with pytest.raises(ValueError, match="no nestable layer") as error:
        nest(_layer_norm_head(), k=2, calib=torch.randn(2, 3, 8, 8), skip=0)
    message = str(error.value)
    assert "head.norm (LayerNorm)" in message and "couples" in message, message
    assert "features.0 (Conv2d)" in message, message  # the layer it un-nested


def test_every_layer_a_coupling_module_un_nests_is_named_with_the_path():
    with pytest.raises(ValueError, match="no nestable layer") as error:
        nest(_layer_norm_head(convs=2), k=2, calib=torch.randn(2, 3, 8, 8), skip=0)
    message = str(error.value)
    assert "head.norm (LayerNorm)" in message, message
    # features.3 writes what the LayerNorm reads; features.0 feeds features.3, which is un-nested.
    assert "features.3 (Conv2d)" in message and "features.0 (Conv2d) through features.3" in message, message


def test_skipped_layers_are_named_as_skipped():
    with pytest.raises(ValueError, match="no nestable layer") as error:
        nest(_layer_norm_head(convs=2), k=2, calib=torch.randn(2, 3, 8, 8), skip=["features"])
    message = str(error.value)
    assert "skip" in message and "features.0 (Conv2d)" in message and "features.3 (Conv2d)" in message, message
