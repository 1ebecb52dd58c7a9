"""One factory for every base model: ``create(name, ...)`` and ``list_models()``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from rdn.models.efficientnet import EfficientNetLite0
from rdn.models.layers import SMALL_INPUT_MAX, is_small_input
from rdn.models.mobilenet_v2 import MobileNetV2
from rdn.models.mobilenext import MobileNeXt
from rdn.models.resnext import resnext50_32x4d, resnext_small

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mobilenet_v2": MobileNetV2,
    "mobilenext": MobileNeXt,
    "resnext50_32x4d": resnext50_32x4d,
    "resnext_small": resnext_small,
    "efficientnet_lite0": EfficientNetLite0,
}
# Models with real pretrained weights, and the configuration those weights fit (ImageNet variant).
_PRETRAINED = {"efficientnet_lite0": {"num_classes": 1000, "in_chans": 3, "width_mult": 1.0}}


def list_models() -> list[str]:
    """Names :func:`create` accepts."""
    return sorted(_BUILDERS)


def create(
    name: str,
    num_classes: int = 1000,
    input_size: int = 224,
    in_chans: int = 3,
    width_mult: float = 1.0,
    pretrained: bool = False,
) -> nn.Module:
    """Build a base model by name.

    Args:
        name: one of :func:`list_models`.
        num_classes: classifier outputs.
        input_size: image side length; <= 64 selects the small-input variant (28×28, 32×32 data),
            larger the ImageNet variant.
        in_chans: input image channels.
        width_mult: channel multiplier (channels rounded to multiples of 8).
        pretrained: load ImageNet weights (``efficientnet_lite0`` at its default configuration
            only; see :mod:`rdn.models.pretrained`).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    config = {"num_classes": num_classes, "input_size": input_size, "in_chans": in_chans, "width_mult": width_mult}
    if pretrained:
        if name not in _PRETRAINED:
            raise ValueError(
                f"pretrained weights are available only for {sorted(_PRETRAINED)}, not for {name!r}; "
                "use pretrained=False"
            )
        expected = _PRETRAINED[name]
        if any(config[key] != value for key, value in expected.items()) or is_small_input(input_size):
            raise ValueError(
                f"pretrained {name!r} exists only for {expected} and the ImageNet variant (input_size > "
                f"{SMALL_INPUT_MAX}), got {config}"
            )
    model = _BUILDERS[name](**config)
    if pretrained:
        from rdn.models.pretrained import load_efficientnet_lite0

        load_efficientnet_lite0(model)
    return model
