"""MobileNetV2 (Sandler et al. 2018): inverted residual blocks with linear bottlenecks.

Nestable (plain) convs: each block's ``expand`` and ``project`` 1×1 and the head 1×1; the stem
3×3 is plain too but stays un-nested by convention. Depthwise: each block's ``depthwise`` 3×3.
"""

from __future__ import annotations

from rdn.models.blocks import InvertedResidual
from rdn.models.layers import (
    ConvBNAct,
    ImageClassifier,
    check_model_args,
    is_small_input,
    make_divisible,
    stack_stages,
)

# (expand ratio t, output channels c, repeats n, stride of the first block s), from the paper.
_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(ImageClassifier):
    """MobileNetV2 with a width multiplier (channels rounded to multiples of 8).

    ImageNet variant (``input_size`` > 64): stride-2 stem, total stride 32. Small-input variant
    (28×28, 32×32): stride-1 stem and the first stride-2 stage at stride 1, total stride 8.
    """

    def __init__(self, num_classes: int = 1000, input_size: int = 224, in_chans: int = 3, width_mult: float = 1.0):
        check_model_args(in_chans, width_mult)
        small = is_small_input(input_size)
        channels = make_divisible(32 * width_mult)
        stem = ConvBNAct(in_chans, channels, 3, stride=1 if small else 2)

        def inverted_residual(stage: int, in_channels: int, out_channels: int, stride: int) -> InvertedResidual:
            return InvertedResidual(in_channels, out_channels, stride, expand_ratio=_STAGES[stage][0])

        stages = [(out_channels, repeats, stride) for _, out_channels, repeats, stride in _STAGES]
        blocks, channels = stack_stages(channels, stages, width_mult, small, inverted_residual)
        num_features = make_divisible(1280 * max(1.0, width_mult))
        head = ConvBNAct(channels, num_features, 1)
        super().__init__(stem, blocks, head, num_features, num_classes, dropout=0.2)
