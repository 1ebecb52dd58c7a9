"""MobileNeXt (Zhou et al. 2020, "Rethinking Bottleneck Structure for Efficient Mobile Network Design").

Sandglass blocks: identity shortcut between wide ends, depthwise 3×3 convs at both ends and the
1×1 reduction / expansion in the middle. Nestable (plain) convs: each block's ``reduce`` and
``expand`` 1×1 (and the stem 3×3, kept un-nested). Depthwise: ``depthwise_in`` / ``depthwise_out``.
There is no head conv: the last block outputs the 1280 pooled features.
"""

from __future__ import annotations

from torch import nn

from rdn.models.blocks import SandglassBlock
from rdn.models.layers import (
    ConvBNAct,
    ImageClassifier,
    check_model_args,
    is_small_input,
    make_divisible,
    stack_stages,
)

# (reduction ratio t, output channels c, repeats n, stride of the first block s): the ImageNet
# configuration of the paper and the authors' code (3.5M parameters, ~310M MACs at 224×224);
# a last single block maps to the 1280 pooled features.
_STAGES = (
    (2, 96, 1, 2),
    (6, 144, 1, 1),
    (6, 192, 3, 2),
    (6, 288, 3, 2),
    (6, 384, 4, 1),
    (6, 576, 4, 2),
    (6, 960, 3, 1),
)


class MobileNeXt(ImageClassifier):
    """MobileNeXt with a width multiplier (channels rounded to multiples of 8).

    ImageNet variant (``input_size`` > 64): stride-2 stem, total stride 32. Small-input variant:
    stride-1 stem and the first stride-2 stage at stride 1, total stride 8.
    """

    def __init__(self, num_classes: int = 1000, input_size: int = 224, in_chans: int = 3, width_mult: float = 1.0):
        check_model_args(in_chans, width_mult)
        small = is_small_input(input_size)
        num_features = make_divisible(1280 * max(1.0, width_mult))
        # The final block maps to the features directly: 1280 channels whatever width_mult <= 1.
        stages = (*_STAGES, (6, num_features / width_mult, 1, 1))
        channels = make_divisible(32 * width_mult)
        stem = ConvBNAct(in_chans, channels, 3, stride=1 if small else 2)

        def sandglass(stage: int, in_channels: int, out_channels: int, stride: int) -> SandglassBlock:
            ratio, _, repeats, _ = stages[stage]
            # A single stride-1 block of a stage keeps both depthwise convs (authors' code); a
            # single block's stride is its stage's.
            keep = repeats == 1 and stride == 1
            return SandglassBlock(in_channels, out_channels, stride, ratio, keep)

        body = [(out_channels, repeats, stride) for _, out_channels, repeats, stride in stages]
        blocks, channels = stack_stages(channels, body, width_mult, small, sandglass)
        super().__init__(stem, blocks, nn.Identity(), channels, num_classes, dropout=0.2)
