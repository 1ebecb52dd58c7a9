"""Base models (plain PyTorch) with a uniform structure, a factory, pretrained weights and profiling.

Every model has ``stem``, ``blocks`` (nn.Sequential), ``head``, ``pool`` and ``classifier`` and
``forward_features`` / ``forward`` (see :mod:`rdn.models.layers`); :mod:`rdn.models.blocks`
lists which convolutions of each block are plain (nestable) and which are depthwise / grouped.
"""

from rdn.models.blocks import InvertedResidual, ResNeXtBottleneck, SandglassBlock
from rdn.models.efficientnet import EfficientNetLite0
from rdn.models.factory import create, list_models
from rdn.models.layers import ConvBNAct, ImageClassifier, make_divisible
from rdn.models.mobilenet_v2 import MobileNetV2
from rdn.models.mobilenext import MobileNeXt
from rdn.models.profile import ModelProfile, count_params, profile_model
from rdn.models.resnext import ResNeXt, resnext50_32x4d, resnext_small

__all__ = [
    "ConvBNAct",
    "EfficientNetLite0",
    "ImageClassifier",
    "InvertedResidual",
    "MobileNeXt",
    "MobileNetV2",
    "ModelProfile",
    "ResNeXt",
    "ResNeXtBottleneck",
    "SandglassBlock",
    "count_params",
    "create",
    "list_models",
    "make_divisible",
    "profile_model",
    "resnext50_32x4d",
    "resnext_small",
]
