"""Surgery on model code no one here wrote: timm and torchvision architectures at random init.

Every model either nests, with P1 (later groups never change earlier exits, through every path),
P2 (one pass = K passes = the staged walk), P5 (export) and P3 (N_K is the base model) checked,
or is refused / warned about with a message naming the module and the reason. ConvNeXt nests with
``norms="grouped"`` (its LayerNorms over the channels take statistics per group). Small inputs (32 px),
k = 2, two images: the default run takes a spread of architectures, ``-m slow`` the rest.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from rdn.surgery import CoverageWarning, nest
from rdn.surgery.report import estimate_batch_norm
from tests.surgery import zoo
from tests.surgery.checks import assert_earlier_subnets_ignore_later_groups, assert_paths_agree, relative_error

SIZE = 32


@dataclass(frozen=True)
class Case:
    """What surgery does with a model: nests at least ``share`` of its MACs, or refuses it (``refused``:
    a regex of the error), or nests it with a coverage warning (``warns``: a regex of the warning);
    ``norms``: the surgery's option."""

    share: float = 0.5
    refused: str | None = None
    warns: str | None = None
    slow: bool = False
    norms: str = "fixed"


CASES = {
    # timm: the ten
    "timm/mobilenetv3_small_100": Case(),
    "timm/efficientnet_b0": Case(slow=True),
    "timm/resnet18": Case(),
    "timm/mnasnet_100": Case(slow=True),
    "timm/mobilenetv2_100": Case(slow=True),
    "timm/regnetx_002": Case(),  # head.flatten after head.fc
    "timm/resnext26ts": Case(slow=True),
    # the partial residual x[:, :in_chs] += shortcut cuts its channels to a fixed count
    "timm/rexnet_100": Case(share=0.0, warns=r"getitem\(\) in features\.\d+ .*changes the channel count"),
    "timm/ghostnet_100": Case(),  # ghost modules concatenate
    # LayerNorm2d over the channels (grouped), the layer scale x.mul(gamma.reshape(1, -1, 1, 1)) per channel
    "timm/convnext_atto": Case(norms="grouped"),
    "timm/densenet121": Case(slow=True),
    "timm/repvgg_a0": Case(slow=True),
    # torchvision
    "tv/mobilenet_v2": Case(),
    "tv/resnet18": Case(slow=True),
    "tv/mnasnet0_5": Case(slow=True),
    "tv/mobilenet_v3_small": Case(slow=True),
    "tv/efficientnet_b0": Case(slow=True),
    "tv/regnet_x_400mf": Case(slow=True),
    "tv/densenet121": Case(slow=True),
    "tv/googlenet": Case(),  # inception blocks concatenate branches
    # the channel shuffle (view → transpose → view) mixes the channels of every block
    "tv/shufflenet_v2_x0_5": Case(share=0.0, warns=r"\.view\(\) in stage\d\.\d .*changes the channel count"),
    # its classifier is a 1×1 conv (then ReLU and pooling)
    "tv/squeezenet1_0": Case(refused=r"nn\.Linear classifier .*got classifier\.\d \(\w+\)"),
    # its layer scale (C, 1, 1) folds per channel, but CNBlock runs its MLP channels-last (Permute → LayerNorm →
    # Linear → GELU → Linear → Permute), which surgery does not follow
    "tv/convnext_tiny": Case(
        refused=r"features\.\d\.\d\.block\.\d \(Permute\) permutes the dimensions .*channels-last",
        norms="grouped",
        slow=True,
    ),
}


def _model(name: str) -> nn.Module:
    source, architecture = name.split("/")
    torch.manual_seed(0)
    if source == "timm":
        return zoo.timm().create_model(architecture, num_classes=10)
    options = {"aux_logits": False, "init_weights": False} if architecture == "googlenet" else {}
    return getattr(zoo.torchvision().models, architecture)(num_classes=10, **options)


def _params():
    for name, case in CASES.items():
        yield pytest.param(name, case, id=name, marks=[pytest.mark.slow] if case.slow else [])


@pytest.mark.parametrize("name, case", list(_params()))
def test_zoo_model_nests_with_every_property_or_is_refused_by_name(name, case):
    model = _model(name)
    images = torch.randn(12, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    calib, check = images[:2], images[2:4]
    # random init: BN statistics from images (8: at 1×1 pixels two samples give degenerate variances),
    # so activations keep their scale through the layers
    estimate_batch_norm(model, images[4:])
    model.eval()
    if case.refused is not None:
        with pytest.raises(ValueError, match=case.refused):
            nest(model, k=2, calib=calib, exact=True, norms=case.norms)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CoverageWarning)
        net = nest(model, k=2, calib=calib, exact=True, norms=case.norms).eval()  # N_K is the base: checked below
    coverage = [str(warning.message) for warning in caught if issubclass(warning.category, CoverageWarning)]
    if case.warns is not None:
        assert coverage and re.search(case.warns, coverage[0]), coverage
    else:
        assert not coverage, coverage
    assert net.coverage().mac_share >= case.share, net.coverage().report()
    # Random-init logits reach ~30 (EfficientNet-B0): float32 sums in another order differ by ~1e-3 of
    # that; a wrong group or channel order differs by O(1). P1 below is bit-exact.
    assert_paths_agree(net, check, export=True, tolerance=5e-3)
    assert_earlier_subnets_ignore_later_groups(net, check)
    if case.norms == "grouped":
        # Per-group statistics are another function than the base's, except in N_K where the last group of
        # every grouped norm holds the latest copy of each of its channels (expand, exact): then its statistics
        # are the base's (tests/surgery/test_coverage.py, test_grouped_norms_nest_with_every_property).
        grouped = [step.space for step in net.plan.steps if step.role.value == "groupwise"]
        last = net.num_groups - 1
        assert grouped and all(
            sorted(space.source[space.offsets[last] :].tolist()) == list(range(space.channels)) for space in grouped
        )
    with torch.no_grad():
        assert relative_error(net(check)[-1], model(check)) < 1e-3  # float32 sums in other orders
