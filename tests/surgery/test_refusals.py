"""Inputs surgery cannot use are refused with an error that names them and says what was expected."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from rdn.models.profile import profile_model
from rdn.surgery import RussianDollNet, nest
from rdn.surgery.passes.budget import prune_blocks
from rdn.surgery.passes.compensate import compensate_dropped_connections
from rdn.surgery.passes.select import greedy_order
from tests.surgery.toys import toy


def _layer_norm_head(convs: int = 1) -> nn.Module:
    """Conv → BN → ReLU (× ``convs``) → pool → flatten → LayerNorm → Linear: the LayerNorm couples
    every channel of the features, so none of the convs can be nested."""
    layers, channels = [], 3
    for _ in range(convs):
        layers += [nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
        channels = 8
    head = nn.Sequential(OrderedDict(norm=nn.LayerNorm(8), fc=nn.Linear(8, 5)))
    parts = OrderedDict(features=nn.Sequential(*layers), pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), head=head)
    return nn.Sequential(parts).eval()


def test_a_channel_coupling_module_that_stops_the_nesting_is_named():
    with pytest.raises(ValueError, match="no nestable layer") as error:
        nest(_layer_norm_head(), k=2, calib=torch.randn(2, 3, 8, 8), skip=0)
    message = str(error.value)
    assert "head.norm (LayerNorm) normalises over all its channels" in message, message
    assert "norms='grouped'" in message, message  # the option that nests it
    assert "features.0 (Conv2d)" in message, message  # the layer it un-nested


def test_every_layer_a_coupling_module_un_nests_is_named_with_the_path():
    with pytest.raises(ValueError, match="no nestable layer") as error:
        nest(_layer_norm_head(convs=2), k=2, calib=torch.randn(2, 3, 8, 8), skip=0)
    message = str(error.value)
    assert "head.norm (LayerNorm)" in message, message
    # features.3 writes what the LayerNorm reads; features.0 feeds features.3, which is un-nested.
    assert "features.3 (Conv2d)" in message and "features.0 (Conv2d) through features.3" in message, message


def test_skipped_layers_are_named_as_skipped():
    with pytest.raises(ValueError, match="no nestable layer") as error:
        nest(_layer_norm_head(convs=2), k=2, calib=torch.randn(2, 3, 8, 8), skip=["features"])
    message = str(error.value)
    assert "skip" in message and "features.0 (Conv2d)" in message and "features.3 (Conv2d)" in message, message


def _nest_toy(**kwargs) -> RussianDollNet:
    arguments = {"k": 3, "calib": torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(0))}
    return nest(kwargs.pop("model", None) or toy(), skip=["stem"], **(arguments | kwargs))


def _with_nan(shape: tuple[int, ...], value: float = float("nan")) -> torch.Tensor:
    images = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    images[-1, 0, 0, 0] = value
    return images


@pytest.mark.parametrize(
    "calib, match",
    [
        (torch.randn(0, 3, 10, 10), r"calib holds no sample .*\(0, 3, 10, 10\).* N >= 1"),
        ([torch.randn(0, 3, 10, 10)], r"calib holds no sample"),
        (_with_nan((4, 3, 10, 10)), r"calib holds 1 non-finite value\(s\) \(NaN or inf\) in sample\(s\) \[3\]: .*N >="),
        (_with_nan((4, 3, 10, 10), float("inf")), r"calib holds 1 non-finite value"),
        ([torch.randn(2, 3, 10, 10), _with_nan((2, 3, 10, 10))], r"non-finite value.* \[3\]"),
        (torch.randn(3, 10, 10), r"calib must be \(N, 3, H, W\) .*stem\.0 \(Conv2d\).*samples have shape \(10, 10\)"),
        (torch.randn(2, 5, 10, 10), r"calib has 5 channels.*stem\.0 \(Conv2d\) takes 3.*\(N, 3, H, W\)"),
    ],
)
@pytest.mark.parametrize("select", ["greedy", "random"])
def test_unusable_calibration_data_is_refused(calib, match, select):
    """Empty or non-finite calibration data gave greedy select zero or NaN scores, and it silently kept
    the unit index order while the config said "greedy"."""
    with pytest.raises(ValueError, match=match):
        _nest_toy(calib=calib, select=select)


def _nan_weights(module_name: str) -> nn.Module:
    model = toy()
    with torch.no_grad():
        model.get_submodule(module_name).weight[1, 2] = float("nan")
    return model


@pytest.mark.parametrize(
    "settings",
    [
        dict(select="greedy"),
        dict(select="random", exact=False, mac_budget=1.2),
        dict(select="random", exact=False, copy_fraction=0.5, compensate=True),
    ],
)
def test_non_finite_activations_are_refused_naming_the_layer(settings):
    """Every use of the calibration activations (greedy scores, block energies, the refit) needs them finite."""
    with pytest.raises(ValueError, match=r"non-finite .* at body\.2\.conv\.0 \(Conv2d\).*weight holds NaN or inf"):
        _nest_toy(model=_nan_weights("body.2.conv.0"), **settings)


def test_random_select_without_calibration_scores_accepts_what_it_never_reads():
    """With random select and neither mac_budget nor compensate, calib gives only shapes."""
    net = _nest_toy(model=_nan_weights("body.2.conv.0"), select="random", mac_budget=None)
    assert net.rdn_config["select"] == "random"


def test_greedy_order_refuses_non_finite_scores():
    conv = nn.Conv2d(4, 6, 1)
    x = _with_nan((2, 4, 3, 3))
    with pytest.raises(ValueError, match="non-finite"):
        greedy_order(conv, x, torch.tensor([0, 0, 1, 1]), 1, (3, 3))


def test_greedy_ties_are_recorded():
    """Where greedy's scores cannot tell units apart (the first nested layer reads the un-nested stem:
    N_1 sees every input, so every score is 0), the unit index decides, and the config says so."""
    net = _nest_toy(select="greedy")
    assert net.rdn_config["ties"]["select"] == {"body_0": [0, 1]}
    assert net.rdn_config["orders"]["body_0"] == list(range(12))
    assert _nest_toy(select="random").rdn_config["ties"]["select"] == {}
    tied = greedy_order(nn.Conv2d(4, 6, 1), torch.zeros(2, 4, 3, 3), torch.tensor([0, 0, 1, 1]), 1, (3, 3))
    assert tied.order == list(range(6)) and tied.tied_groups == [0]


def test_budget_rows_without_energy_are_recorded_and_non_finite_energies_refused():
    net = _nest_toy(mode="expand", exact=False, mac_budget=None)
    calib = torch.randn(8, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    base_macs = profile_model(toy(), (1, 3, 10, 10)).macs
    name, layer = list(net.nested_layers().items())[-1]
    with torch.no_grad():  # output group 3 of the last nested layer computes nothing on any image
        layer.weight[layer.layout.out_offsets[3] : layer.layout.out_offsets[4]] = 0
    result = prune_blocks(net, calib, 1.2, base_macs)
    assert result.ties == {name: [3]}
    budgeted = _nest_toy(mode="expand", exact=False, mac_budget=1.2, copy_fraction=1.0, compensate=False)
    assert budgeted.rdn_config["ties"]["mac_budget"] == {}
    with pytest.raises(ValueError, match="calib holds 1 non-finite value"):
        prune_blocks(_nest_toy(mode="expand", exact=False, mac_budget=None), _with_nan((8, 3, 10, 10)), 1.2, base_macs)


def test_compensate_refuses_non_finite_calibration_data():
    net = _nest_toy(exact=False, copy_fraction=0.5)
    with pytest.raises(ValueError, match="calib holds 1 non-finite value"):
        compensate_dropped_connections(net, toy(), _with_nan((8, 3, 10, 10)))
    with pytest.raises(ValueError, match=r"non-finite .* at body\.2\.conv\.0 \(Conv2d\)"):
        compensate_dropped_connections(net, _nan_weights("body.2.conv.0"), torch.randn(8, 3, 10, 10))
