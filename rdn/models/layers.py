"""Building blocks every base model shares: channel rounding, conv-BN-act, the classifier skeleton.

Every model is an :class:`ImageClassifier` with the same five parts, so code that transforms
models (surgery, profiling, export) walks them by module type, never by attribute path:

    stem → blocks (nn.Sequential) → head → pool (global average + flatten) → classifier

``forward_features(x)`` returns the pooled features (N, num_features); ``forward(x)`` the
logits (N, num_classes).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

# Inputs up to this side length get the small-input variant (CIFAR / MNIST-like data).
SMALL_INPUT_MAX = 64


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to the nearest multiple of ``divisor``, never more than 10% below.

    The rule of the MobileNet / EfficientNet reference implementations.
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def is_small_input(input_size: int) -> bool:
    """True when ``input_size`` selects the small-input variant; validates the value."""
    if isinstance(input_size, bool) or not isinstance(input_size, int):
        raise TypeError(f"input_size must be an int (the image side length), got {input_size!r}")
    if input_size < 16:
        raise ValueError(f"input_size must be >= 16 (the final feature map would vanish), got {input_size}")
    return input_size <= SMALL_INPUT_MAX


def small_input_strides(strides: Sequence[int]) -> list[int]:
    """Stage strides of the small-input variant: the first stride-2 stage keeps the resolution.

    With a stride-1 stem this takes the total stride from 32 to 8, so 28×28 inputs end at 4×4.
    """
    strides = list(strides)
    strides[strides.index(2)] = 1
    return strides


def stack_stages(
    channels: int,
    stages: Sequence[tuple[float, int, int]],
    width_mult: float,
    small: bool,
    make_block: Callable[[int, int, int, int], nn.Module],
) -> tuple[list[nn.Module], int]:
    """The blocks of a MobileNet-style body of stages, and the channels of its output.

    Args:
        channels: input channels of the first block (the stem's output).
        stages: per stage (output channels before ``width_mult``, number of blocks, stride of its
            first block). Output channels are scaled and rounded with :func:`make_divisible`; the
            small-input variant runs the first stride-2 stage at stride 1 (:func:`small_input_strides`).
        make_block: ``(stage index, in_channels, out_channels, stride) -> block``.
    """
    strides = [stride for _, _, stride in stages]
    strides = small_input_strides(strides) if small else strides
    blocks = []
    for stage, ((out_channels, repeats, _), stride) in enumerate(zip(stages, strides, strict=True)):
        out_channels = make_divisible(out_channels * width_mult)
        for index in range(repeats):
            blocks.append(make_block(stage, channels, out_channels, stride if index == 0 else 1))
            channels = out_channels
    return blocks, channels


class TFSamePad2d(nn.Module):
    """TensorFlow "SAME" padding for a strided conv: pads so the output is ceil(size / stride).

    For an even input and stride 2 the padding is one pixel more on the bottom/right than on the
    top/left; weights trained in TensorFlow (EfficientNet-Lite) expect exactly that.
    """

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad order: width first
            total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel_size - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) → BatchNorm2d → activation, as an ``nn.Sequential`` with named children.

    Children: ``pad`` (only with ``tf_same_padding`` and stride > 1), ``conv``, ``bn``, ``act``
    (absent when ``act`` is None: the linear bottleneck projections).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: type[nn.Module] | None = nn.ReLU6,
        bn_eps: float = 1e-5,
        tf_same_padding: bool = False,
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        padding = (kernel_size - 1) // 2
        if tf_same_padding and stride > 1:
            layers["pad"] = TFSamePad2d(kernel_size, stride)
            padding = 0
        layers["conv"] = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        layers["bn"] = nn.BatchNorm2d(out_channels, eps=bn_eps)
        if act is not None:
            layers["act"] = act(inplace=True)
        super().__init__(layers)


class ImageClassifier(nn.Module):
    """The skeleton of every base model (see the module docstring).

    Args:
        stem: input (N, in_chans, H, W) → first feature map.
        blocks: the body, in order; stored as ``nn.Sequential``.
        head: after the blocks, up to the features that are pooled (``nn.Identity`` if none).
        num_features: channels of the head's output (= the classifier's input).
        num_classes: classifier outputs.
        dropout: dropout before the classifier's linear layer (0: the classifier is a bare Linear).
    """

    def __init__(
        self,
        stem: nn.Module,
        blocks: Sequence[nn.Module],
        head: nn.Module,
        num_features: int,
        num_classes: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.head = head
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        linear = nn.Linear(num_features, num_classes)
        self.classifier = nn.Sequential(nn.Dropout(dropout), linear) if dropout > 0 else linear
        self.num_features = num_features
        self.num_classes = num_classes
        _init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, in_chans, H, W) → pooled features (N, num_features)."""
        return self.pool(self.head(self.blocks(self.stem(x))))

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_chans, H, W) → logits (N, num_classes)."""
        return self.classifier(self.forward_features(x))


def _init_weights(model: nn.Module) -> None:
    # The torchvision / reference recipe for these families.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)


def check_model_args(in_chans: int, width_mult: float) -> None:
    """Validate the arguments every model constructor takes."""
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
    if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not width_mult > 0:
        raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")
