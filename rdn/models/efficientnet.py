"""EfficientNet-Lite0 (the Lite variants of Tan & Le 2019, for mobile accelerators).

MBConv blocks without squeeze-excite, ReLU6 everywhere, and a stem (32) and head (1280) that
width scaling leaves fixed. Convs follow TensorFlow's "SAME" padding — asymmetric at stride 2 —
because the available ImageNet weights were trained in TensorFlow (:mod:`rdn.models.pretrained`);
BN epsilon is TensorFlow's 1e-3 for the same reason.

Nestable (plain) convs: each block's ``expand`` and ``project`` 1×1 and the head 1×1 (the stem
3×3 stays un-nested). Depthwise: each block's ``depthwise`` 3×3 or 5×5.
"""

from __future__ import annotations

from rdn.models.blocks import InvertedResidual
from rdn.models.layers import (
    ConvBNAct,
    ImageClassifier,
    check_model_args,
    is_small_input,
    stack_stages,
)

# (expand ratio, kernel, stride of the first block, output channels, repeats) of EfficientNet-B0/Lite0.
_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
_BN_EPS = 1e-3
STEM_CHANNELS = 32
NUM_FEATURES = 1280


class EfficientNetLite0(ImageClassifier):
    """EfficientNet-Lite0 with a width multiplier on the blocks (stem and head fixed).

    ImageNet variant (``input_size`` > 64): stride-2 stem, total stride 32. Small-input variant:
    stride-1 stem and the first stride-2 stage at stride 1, total stride 8.
    """

    def __init__(self, num_classes: int = 1000, input_size: int = 224, in_chans: int = 3, width_mult: float = 1.0):
        check_model_args(in_chans, width_mult)
        small = is_small_input(input_size)
        stem = ConvBNAct(in_chans, STEM_CHANNELS, 3, stride=1 if small else 2, bn_eps=_BN_EPS, tf_same_padding=True)

        def mbconv(stage: int, in_channels: int, out_channels: int, stride: int) -> InvertedResidual:
            expand_ratio, kernel = _STAGES[stage][:2]
            return InvertedResidual(
                in_channels, out_channels, stride, expand_ratio, kernel, bn_eps=_BN_EPS, tf_same_padding=True
            )

        stages = [(out_channels, repeats, stride) for _, _, stride, out_channels, repeats in _STAGES]
        blocks, channels = stack_stages(STEM_CHANNELS, stages, width_mult, small, mbconv)
        head = ConvBNAct(channels, NUM_FEATURES, 1, bn_eps=_BN_EPS)
        super().__init__(stem, blocks, head, NUM_FEATURES, num_classes, dropout=0.2)
