"""The layer shapes the nested-conv benchmarks run on, and the benchmark cases built from them.

Every nested layer of the models the project targets is a plain (groups = 1) 1×1 convolution or
a linear layer: MobileNetV2's and EfficientNet-Lite's 3×3/5×5 convolutions are depthwise,
ResNeXt's 3×3 are grouped (32 groups) and the stems read 3 RGB channels; none of those is nested
(DESIGN.md §4, step 1). So the model tables below list only the 1×1 convolutions and the
classifier of each model. To still measure the 3×3 path of the kernels, :func:`resnet_style_3x3`
adds dense 3×3 convolutions (stride 1, padding 1, C → C) at MobileNetV2's stage widths and
resolutions — the 3×3 a ResNet-style network of the same widths would have. They are labelled
``resnet-style-3x3@mobilenet_v2_1.0``, never as MobileNetV2 layers.

Channel groups are equal splits (:func:`rdn.nn.split_channels`: the remainder goes to the first
groups), the block mask is the full lower triangle.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import torch

from rdn.nn import split_channels
from rdn_kernels import NestedLayout, make_layout

MODES = ("forward", "stage", "backward")


@dataclass(frozen=True)
class LayerShape:
    """One nested layer, without its batch size.

    A convolution reads (N, in_channels, height, width) with a (kernel × kernel) weight; a linear
    layer (``is_linear``) reads (N, in_channels) and has height = width = kernel = 1.
    ``sources`` names where the shape occurs (``"mobilenet_v2_1.0 b3.expand"``, ...).
    """

    in_channels: int
    out_channels: int
    height: int = 1
    width: int = 1
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    is_linear: bool = False
    sources: tuple[str, ...] = ()

    @property
    def geometry_key(self) -> tuple:
        """Everything but ``sources``: two layers with the same key are the same benchmark."""
        return (self.in_channels, self.out_channels, self.height, self.width, self.kernel, self.stride,
                self.padding, self.is_linear)

    @property
    def output_size(self) -> tuple[int, int]:
        def one(size: int) -> int:
            return (size + 2 * self.padding - self.kernel) // self.stride + 1

        return one(self.height), one(self.width)

    @property
    def label(self) -> str:
        """Short human name, e.g. ``1x1 24→144 @56`` or ``linear 1280→1000``."""
        if self.is_linear:
            return f"linear {self.in_channels}→{self.out_channels}"
        stride = f" s{self.stride}" if self.stride != 1 else ""
        return f"{self.kernel}x{self.kernel}{stride} {self.in_channels}→{self.out_channels} @{self.height}"

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(source.split(" ")[0] for source in self.sources))


def _conv1x1(source: str, in_channels: int, out_channels: int, resolution: int, stride: int = 1) -> LayerShape:
    return LayerShape(in_channels, out_channels, resolution, resolution, 1, stride, 0, False, (source,))


def _linear(source: str, in_channels: int, out_channels: int) -> LayerShape:
    return LayerShape(in_channels, out_channels, is_linear=True, sources=(source,))


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Channel rounding of the MobileNet family (TensorFlow slim): nearest multiple, at most 10% down."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _halve(resolution: int, stride: int) -> int:
    # A stride-2 3×3 (padding 1) maps an even size s to s / 2 and an odd one to (s + 1) / 2.
    return (resolution - 1) // stride + 1


# (expansion t, output channels c, repeats n, first stride s) — MobileNetV2 paper, Table 2.
_MOBILENET_V2_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                        (6, 160, 3, 2), (6, 320, 1, 1))


def _mobilenet_v2_stage_outputs(width_mult: float, resolution: int) -> list[tuple[int, int]]:
    """(channels, resolution) after each block stage of MobileNetV2."""
    size = _halve(resolution, 2)  # the stem: 3×3 stride 2
    stages = []
    for _, channels, _, stride in _MOBILENET_V2_BLOCKS:
        size = _halve(size, stride)
        stages.append((_make_divisible(channels * width_mult), size))
    return stages


def mobilenet_v2(width_mult: float = 1.0, resolution: int = 224) -> list[LayerShape]:
    """The 1×1 convolutions (expansion, projection, last conv) and the classifier of MobileNetV2.

    Block layout as in torchvision: expansion 1×1 at the block's input resolution, depthwise
    3×3 with the stride, projection 1×1 at the output resolution.
    """
    model = f"mobilenet_v2_{width_mult:.1f}"
    in_channels = _make_divisible(32 * width_mult)
    size = _halve(resolution, 2)
    layers = []
    block = 0
    for expansion, channels, repeats, first_stride in _MOBILENET_V2_BLOCKS:
        out_channels = _make_divisible(channels * width_mult)
        for repeat in range(repeats):
            stride = first_stride if repeat == 0 else 1
            hidden = int(round(in_channels * expansion))
            if expansion != 1:
                layers.append(_conv1x1(f"{model} b{block}.expand", in_channels, hidden, size))
            size = _halve(size, stride)
            layers.append(_conv1x1(f"{model} b{block}.project", hidden, out_channels, size))
            in_channels = out_channels
            block += 1
    last_channels = _make_divisible(1280 * max(1.0, width_mult))
    layers.append(_conv1x1(f"{model} last_conv", in_channels, last_channels, size))
    layers.append(_linear(f"{model} classifier", last_channels, 1000))
    return layers


# (t, c, n, s) of MobileNeXt 1.0 (Zhou et al. 2020, "Rethinking bottleneck structure", Table 3
# and the authors' reference code, which repeats the 960-channel block 3 times).
_MOBILENEXT_BLOCKS = ((2, 96, 1, 2), (6, 144, 1, 1), (6, 192, 3, 2), (6, 288, 3, 2), (6, 384, 4, 1),
                      (6, 576, 4, 2), (6, 960, 3, 1), (6, 1280, 1, 1))


def mobilenext(resolution: int = 224) -> list[LayerShape]:
    """The two 1×1 convolutions of every sandglass block of MobileNeXt 1.0, and the classifier.

    A sandglass block reduces C → C / t and expands back to the output width, both 1×1 at the
    block's input resolution (the stride is on the last depthwise 3×3). The reduced width is
    raised to ceil(C_out / 6), rounded to 16, when C / t is smaller than that.
    """
    model = "mobilenext_1.0"
    in_channels = 32
    size = _halve(resolution, 2)
    layers = []
    block = 0
    for reduction, out_channels, repeats, first_stride in _MOBILENEXT_BLOCKS:
        for repeat in range(repeats):
            hidden = in_channels // reduction
            if hidden < out_channels / 6:
                hidden = _make_divisible(math.ceil(out_channels / 6), 16)
            layers.append(_conv1x1(f"{model} b{block}.reduce", in_channels, hidden, size))
            layers.append(_conv1x1(f"{model} b{block}.expand", hidden, out_channels, size))
            size = _halve(size, first_stride if repeat == 0 else 1)
            in_channels = out_channels
            block += 1
    layers.append(_linear(f"{model} classifier", in_channels, 1000))
    return layers


def resnext50_32x4d(resolution: int = 224) -> list[LayerShape]:
    """The 1×1 convolutions (reduce, expand, stride-2 downsample) and the fc of ResNeXt-50 32×4d.

    Its 3×3 convolutions are grouped (32 groups) and stay un-nested. torchvision layout: the
    stride is on the 3×3, the downsample 1×1 has it too.
    """
    model = "resnext50_32x4d"
    size = resolution // 4  # stem conv stride 2 + max-pool stride 2
    in_channels = 64
    layers = []
    for stage, (planes, repeats) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        width, out_channels = planes * 2, planes * 4  # width = planes · (4 / 64) · 32 groups
        stride = 1 if stage == 1 else 2
        for repeat in range(repeats):
            name = f"{model} layer{stage}.{repeat}"
            block_stride = stride if repeat == 0 else 1
            out_size = _halve(size, block_stride)
            layers.append(_conv1x1(f"{name}.conv1", in_channels, width, size))
            layers.append(_conv1x1(f"{name}.conv3", width, out_channels, out_size))
            if repeat == 0:
                layers.append(_conv1x1(f"{name}.downsample", in_channels, out_channels, size, block_stride))
            in_channels, size = out_channels, out_size
    layers.append(_linear(f"{model} fc", in_channels, 1000))
    return layers


# (expansion, output channels, repeats, first stride) of EfficientNet-B0 = EfficientNet-Lite0
# (Lite: no squeeze-excite, ReLU6, stem 32 and head 1280 fixed). Kernel sizes are depthwise only.
_EFFICIENTNET_LITE0_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 40, 2, 2), (6, 80, 3, 2), (6, 112, 3, 1),
                              (6, 192, 4, 2), (6, 320, 1, 1))


def efficientnet_lite0(resolution: int = 224) -> list[LayerShape]:
    """The 1×1 convolutions (expansion, projection, head) and the classifier of EfficientNet-Lite0."""
    model = "efficientnet_lite0"
    in_channels = 32
    size = _halve(resolution, 2)
    layers = []
    block = 0
    for expansion, out_channels, repeats, first_stride in _EFFICIENTNET_LITE0_BLOCKS:
        for repeat in range(repeats):
            hidden = in_channels * expansion
            if expansion != 1:
                layers.append(_conv1x1(f"{model} b{block}.expand", in_channels, hidden, size))
            size = _halve(size, first_stride if repeat == 0 else 1)
            layers.append(_conv1x1(f"{model} b{block}.project", hidden, out_channels, size))
            in_channels = out_channels
            block += 1
    layers.append(_conv1x1(f"{model} head", in_channels, 1280, size))
    layers.append(_linear(f"{model} classifier", 1280, 1000))
    return layers


def resnet_style_3x3(width_mult: float = 1.0, resolution: int = 224) -> list[LayerShape]:
    """Dense 3×3 convolutions C → C (stride 1, padding 1) at MobileNetV2's stage widths/resolutions.

    Not layers of MobileNetV2 (its 3×3 are depthwise): the 3×3 a ResNet-style net of the same
    widths would have, to benchmark the kernels' 3×3 path at realistic sizes.
    """
    model = f"resnet-style-3x3@mobilenet_v2_{width_mult:.1f}"
    return [
        LayerShape(channels, channels, size, size, 3, 1, 1, False, (f"{model} stage{index}",))
        for index, (channels, size) in enumerate(_mobilenet_v2_stage_outputs(width_mult, resolution), start=1)
    ]


def tiny() -> list[LayerShape]:
    """A few small layers covering every path (1×1, strided 1×1, 3×3 with padding, linear), for tests."""
    return [
        LayerShape(12, 8, 5, 5, 1, 1, 0, False, ("tiny 1x1",)),
        LayerShape(9, 14, 6, 6, 1, 2, 0, False, ("tiny 1x1-s2",)),
        LayerShape(8, 8, 6, 5, 3, 1, 1, False, ("tiny 3x3",)),
        LayerShape(11, 9, is_linear=True, sources=("tiny linear",)),
    ]


def deduplicate(layers: Iterable[LayerShape]) -> list[LayerShape]:
    """One entry per distinct shape (first-seen order), with the sources of all its occurrences."""
    merged: dict[tuple, LayerShape] = {}
    for layer in layers:
        seen = merged.get(layer.geometry_key)
        merged[layer.geometry_key] = layer if seen is None else replace(seen, sources=seen.sources + layer.sources)
    return list(merged.values())


# ----------------------------------------------------------------------------------------------
# Benchmark cases and plans
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One benchmark row: a layer at a batch size, K equal groups, a dtype and a mode.

    ``mode`` is ``"forward"`` (all K groups), ``"stage"`` (output group ``stage`` only, written
    with ``out=`` into a preallocated full output, reading input groups <= ``stage``) or
    ``"backward"`` (forward + gradients of input and weight).
    """

    layer: LayerShape
    batch: int
    num_groups: int
    dtype: torch.dtype
    mode: str
    stage: int | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if (self.mode == "stage") != (self.stage is not None):
            raise ValueError(f"stage must be given exactly for mode 'stage', got mode={self.mode!r} stage={self.stage}")

    @cached_property
    def layout(self) -> NestedLayout:
        return make_layout(split_channels(self.layer.in_channels, self.num_groups),
                           split_channels(self.layer.out_channels, self.num_groups))

    @property
    def stages(self) -> tuple[int, int]:
        """The output groups (lo, hi) this case computes."""
        return (self.stage, self.stage + 1) if self.mode == "stage" else (0, self.num_groups)

    @property
    def mode_label(self) -> str:
        return f"stage {self.stage + 1}/{self.num_groups}" if self.mode == "stage" else self.mode


@dataclass(frozen=True)
class Plan:
    """What one benchmark run covers: layers × batches × K × dtypes × modes.

    ``stages`` is ``"all"`` (every stage of every K) or ``"ends"`` (the first and the last stage).
    """

    layers: tuple[LayerShape, ...]
    batches: tuple[int, ...]
    group_counts: tuple[int, ...] = (4, 7)
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    stages: str = "all"

    def cases(self, modes: Sequence[str] = MODES) -> list[Case]:
        """Cases grouped so that consecutive ones share (layer, batch, K, dtype), hence tensors."""
        unknown = set(modes) - set(MODES)
        if unknown:
            raise ValueError(f"modes must be among {MODES}, got {sorted(unknown)}")
        cases = []
        for layer in self.layers:
            for batch in self.batches:
                for num_groups in self.group_counts:
                    for dtype in self.dtypes:
                        for mode in (m for m in MODES if m in modes):
                            if mode != "stage":
                                cases.append(Case(layer, batch, num_groups, dtype, mode))
                                continue
                            stages = range(num_groups) if self.stages == "all" else sorted({0, num_groups - 1})
                            cases.extend(Case(layer, batch, num_groups, dtype, mode, s) for s in stages)
        return cases


def _pick(layers: Sequence[LayerShape], labels: Sequence[str]) -> tuple[LayerShape, ...]:
    by_label = {layer.label: layer for layer in layers}
    missing = [label for label in labels if label not in by_label]
    if missing:
        raise ValueError(f"quick-subset shapes {missing} are not in the layer list")
    return tuple(by_label[label] for label in labels)


def gpu_layers() -> list[LayerShape]:
    """Every nested layer of the GPU model list, deduplicated, plus the labelled 3×3 set."""
    return deduplicate([*mobilenet_v2(1.0), *mobilenet_v2(1.4), *mobilenext(), *resnext50_32x4d(),
                        *efficientnet_lite0(), *resnet_style_3x3(1.0)])


def cpu_layers() -> list[LayerShape]:
    """MobileNetV2 1.0's 1×1 convolutions and classifier, plus the labelled 3×3 set."""
    return deduplicate([*mobilenet_v2(1.0), *resnet_style_3x3(1.0)])


_CPU_QUICK = ("1x1 24→144 @56", "1x1 144→32 @28", "1x1 384→64 @14", "1x1 960→320 @7", "1x1 320→1280 @7",
              "3x3 32→32 @28", "3x3 96→96 @14", "linear 1280→1000")
# Sized for gpu-check's 240 s per layout (96 cases at K = 4; each Triton autotune key compiles and
# benchmarks its configurations, about 0.5 s each): MobileNetV2's widest and a narrow 7 × 7 layer,
# ResNeXt-50's 14 × 14 and strided layers, a 3 × 3 and the classifier.
_GPU_QUICK = ("1x1 16→96 @112", "1x1 960→320 @7", "1x1 512→1024 @14", "1x1 s2 1024→2048 @14", "3x3 96→96 @14",
              "linear 2048→1000")


def plan(name: str) -> Plan:
    """The named plan: ``cpu``, ``cpu-quick``, ``gpu``, ``gpu-quick`` or ``tiny`` (tests)."""
    if name == "cpu":
        return Plan(tuple(cpu_layers()), batches=(16,))
    if name == "cpu-quick":
        return Plan(_pick(cpu_layers(), _CPU_QUICK), batches=(16,), stages="ends")
    if name == "gpu":
        return Plan(tuple(gpu_layers()), batches=(128, 64, 1), dtypes=(torch.bfloat16, torch.float16, torch.float32))
    if name == "gpu-quick":
        return Plan(_pick(gpu_layers(), _GPU_QUICK), batches=(128, 1), group_counts=(4,),
                    dtypes=(torch.bfloat16, torch.float32), stages="ends")
    if name == "tiny":
        return Plan(tuple(tiny()), batches=(2,))
    raise ValueError(f"plan must be one of {PLAN_NAMES}, got {name!r}")


PLAN_NAMES = ("cpu", "cpu-quick", "gpu", "gpu-quick", "tiny")
