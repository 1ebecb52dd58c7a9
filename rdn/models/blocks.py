"""The residual blocks of the base models.

Each block keeps its layers in ``self.conv`` (an ``nn.Sequential`` of :class:`ConvBNAct` with
named children) and its residual add in ``forward``. Which convolutions are *plain* (groups = 1,
nestable with :class:`rdn.nn.NestedConv2d`) and which act per channel group:

=====================  ==========================================  ===============================
block                  plain convs (nestable)                      depthwise / grouped (per group)
=====================  ==========================================  ===============================
InvertedResidual       ``expand`` 1×1, ``project`` 1×1             ``depthwise`` k×k (groups = C)
SandglassBlock         ``reduce`` 1×1, ``expand`` 1×1              ``depthwise_in``,
                                                                   ``depthwise_out`` 3×3
ResNeXtBottleneck      ``reduce`` 1×1, ``expand`` 1×1,             ``grouped`` 3×3 (groups =
                       ``shortcut`` 1×1 (when present)             cardinality)
=====================  ==========================================  ===============================

A grouped conv can only be nested when every nested channel group is a union of whole conv
groups; depthwise convs (and BN, activations) need no change at all.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import Tensor, nn

from rdn.models.layers import ConvBNAct, make_divisible


class _ResidualStack(nn.Module):
    """``self.conv`` (an ``nn.Sequential`` of named layers), plus the input when the shapes allow.

    The identity shortcut is used when the stride is 1 and the channel count is unchanged.
    """

    def __init__(self, layers: OrderedDict[str, nn.Module], in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class InvertedResidual(_ResidualStack):
    """MobileNetV2 inverted residual / EfficientNet-Lite MBConv (no squeeze-excite).

    1×1 expand (skipped when ``expand_ratio == 1``) → k×k depthwise (stride) → 1×1 linear
    projection; identity shortcut when the stride is 1 and the channel count is unchanged.
    Shapes: (N, in_channels, H, W) → (N, out_channels, H / stride, W / stride).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        expand_ratio: float,
        kernel_size: int = 3,
        bn_eps: float = 1e-5,
        tf_same_padding: bool = False,
    ) -> None:
        hidden = int(round(in_channels * expand_ratio))
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if expand_ratio != 1:
            layers["expand"] = ConvBNAct(in_channels, hidden, 1, bn_eps=bn_eps)
        layers["depthwise"] = ConvBNAct(
            hidden, hidden, kernel_size, stride, groups=hidden, bn_eps=bn_eps, tf_same_padding=tf_same_padding
        )
        layers["project"] = ConvBNAct(hidden, out_channels, 1, act=None, bn_eps=bn_eps)
        super().__init__(layers, in_channels, out_channels, stride)


class SandglassBlock(_ResidualStack):
    """MobileNeXt sandglass block (Zhou et al. 2020, "Rethinking Bottleneck Structure ...").

    3×3 depthwise + ReLU6 on the wide input → 1×1 linear reduction to ``in / reduction_ratio``
    → 1×1 expansion + ReLU6 → 3×3 linear depthwise (stride); identity shortcut between the wide
    ends when the stride is 1 and the channel count is unchanged.

    As in the authors' released code, the reduction is never narrower than ``out / 6`` (then
    rounded to a multiple of 16), and a block that changes the channel count at stride 1 drops
    the depthwise convs (the first one also at stride 2) unless ``keep_depthwise`` — the
    paper's configuration relies on this to reach its parameter and MAC counts.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, reduction_ratio: int, keep_depthwise: bool = False
    ) -> None:
        hidden = in_channels // reduction_ratio
        if hidden < out_channels / 6:
            hidden = make_divisible(math.ceil(out_channels / 6), 16)
        keep = keep_depthwise or reduction_ratio == 2 or in_channels == out_channels
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if keep:
            layers["depthwise_in"] = ConvBNAct(in_channels, in_channels, 3, groups=in_channels)
        layers["reduce"] = ConvBNAct(in_channels, hidden, 1, act=None)
        layers["expand"] = ConvBNAct(hidden, out_channels, 1)
        if keep or stride > 1:
            layers["depthwise_out"] = ConvBNAct(out_channels, out_channels, 3, stride, groups=out_channels, act=None)
        super().__init__(layers, in_channels, out_channels, stride)


class ResNeXtBottleneck(nn.Module):
    """ResNeXt bottleneck: 1×1 reduce → 3×3 grouped conv (stride) → 1×1 expand, + shortcut, ReLU.

    The shortcut is a strided 1×1 conv + BN when the shape changes, else the identity.
    Shapes: (N, in_channels, H, W) → (N, out_channels, H / stride, W / stride).
    """

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int, cardinality: int) -> None:
        super().__init__()
        if width % cardinality:
            raise ValueError(f"the grouped conv width {width} must be a multiple of the cardinality {cardinality}")
        self.conv = nn.Sequential(
            OrderedDict(
                reduce=ConvBNAct(in_channels, width, 1, act=nn.ReLU),
                grouped=ConvBNAct(width, width, 3, stride, groups=cardinality, act=nn.ReLU),
                expand=ConvBNAct(width, out_channels, 1, act=None),
            )
        )
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = ConvBNAct(in_channels, out_channels, 1, stride, act=None)
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x) + self.shortcut(x))
