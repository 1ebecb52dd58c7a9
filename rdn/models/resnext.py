"""ResNeXt (Xie et al. 2017): bottlenecks whose 3×3 conv is grouped (cardinality groups).

``ResNeXt50_32x4d`` is the ImageNet model; ``resnext_small`` a ResNeXt-29-style network with
three stages of two blocks, narrow enough for CPU tests. Nestable (plain) convs: each block's
``reduce`` and ``expand`` 1×1 and its ``shortcut`` 1×1 (the stem stays un-nested). Grouped:
each block's ``grouped`` 3×3 (see :mod:`rdn.models.blocks` for when it can be nested).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from rdn.models.blocks import ResNeXtBottleneck
from rdn.models.layers import ConvBNAct, ImageClassifier, check_model_args, is_small_input, make_divisible


class ResNeXt(ImageClassifier):
    """A ResNeXt of bottleneck stages.

    Args:
        stages: per stage (blocks, grouped-conv width, output channels, stride of its first block),
            before ``width_mult``; widths are rounded to multiples of ``cardinality`` (and of 8),
            output channels to multiples of 8.
        cardinality: groups of every 3×3 conv.
        stem_channels: before ``width_mult``.

    ImageNet variant (``input_size`` > 64): 7×7 stride-2 stem and a stride-2 max-pool. Small-input
    variant: a 3×3 stride-1 stem and no pool (total stride / 4: ResNeXt-50 ends at 4×4 on 32×32).
    """

    def __init__(
        self,
        stages: Sequence[tuple[int, int, int, int]],
        cardinality: int,
        stem_channels: int,
        num_classes: int = 1000,
        input_size: int = 224,
        in_chans: int = 3,
        width_mult: float = 1.0,
    ) -> None:
        check_model_args(in_chans, width_mult)
        small = is_small_input(input_size)
        channels = make_divisible(stem_channels * width_mult)
        if small:
            stem: nn.Module = ConvBNAct(in_chans, channels, 3, act=nn.ReLU)
        else:
            stem = nn.Sequential(
                ConvBNAct(in_chans, channels, 7, stride=2, act=nn.ReLU), nn.MaxPool2d(3, stride=2, padding=1)
            )
        width_divisor = max(cardinality, 8)
        blocks = []
        for repeats, width, out_channels, stride in stages:
            width = make_divisible(width * width_mult, width_divisor)
            out_channels = make_divisible(out_channels * width_mult)
            for index in range(repeats):
                block_stride = stride if index == 0 else 1
                blocks.append(ResNeXtBottleneck(channels, width, out_channels, block_stride, cardinality))
                channels = out_channels
        super().__init__(stem, blocks, nn.Identity(), channels, num_classes)


def resnext50_32x4d(
    num_classes: int = 1000, input_size: int = 224, in_chans: int = 3, width_mult: float = 1.0
) -> ResNeXt:
    """ResNeXt-50 (32×4d): stages of 3, 4, 6, 3 bottlenecks, grouped widths 128..1024, outputs 256..2048."""
    stages = ((3, 128, 256, 1), (4, 256, 512, 2), (6, 512, 1024, 2), (3, 1024, 2048, 2))
    return ResNeXt(stages, 32, 64, num_classes, input_size, in_chans, width_mult)


def resnext_small(
    num_classes: int = 1000, input_size: int = 224, in_chans: int = 3, width_mult: float = 1.0
) -> ResNeXt:
    """A small ResNeXt (8 groups, 3 stages × 2 bottlenecks, 64..256 channels, ~0.3M parameters)."""
    stages = ((2, 32, 64, 1), (2, 64, 128, 2), (2, 128, 256, 2))
    return ResNeXt(stages, 8, 32, num_classes, input_size, in_chans, width_mult)
