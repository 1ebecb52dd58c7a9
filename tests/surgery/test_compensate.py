"""``nest(..., compensate=True)``: least-squares refit of the copies that miss input connections."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rdn.surgery import nest
from rdn.surgery.passes.compensate import compensate_dropped_connections
from tests.surgery.checks import assert_earlier_subnets_ignore_later_groups, assert_paths_agree
from tests.surgery.test_nest import nested_toy
from tests.surgery.toys import toy


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 10, 10, generator=torch.Generator().manual_seed(1))


def _linear_stack(kernel: int, stride: int) -> nn.Module:
    """1-channel images → 1×1 stem (skipped) → a nested 1×1 conv → a nested kernel × kernel conv
    with bias, no non-linearity and no bias before it: every channel the nested layers read is a
    multiple of the image (zero padding included), so every input patch is a multiple of any other
    channel's and the refit can reconstruct every dropped connection exactly."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 1, bias=False), nn.Conv2d(6, 8, 1, bias=False),
                         nn.Conv2d(8, 6, kernel, stride, padding=kernel // 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(6, 5)).eval()  # fmt: skip


def _feature_error(net, base, images, subnet: int) -> float:
    """Relative error of exit ``subnet``'s logits against the base model's."""
    with torch.no_grad():
        reference = base(images)
        return float((net(images, subnet=subnet) - reference).norm() / reference.norm())


@pytest.mark.parametrize("kernel, stride", [(1, 1), (3, 2)])
def test_dropped_connections_are_reconstructed_when_the_inputs_allow_it(kernel, stride):
    base = _linear_stack(kernel, stride)
    calib = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    test = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    plain = nest(base, k=2, mode="truncate", calib=calib, skip=["0"]).eval()
    refitted = nest(base, k=2, mode="truncate", calib=calib, skip=["0"]).eval()
    refitted_rows = compensate_dropped_connections(refitted, base, calib, shrinkage=1e-9)
    assert refitted_rows > 0
    # The exits' heads are not refitted; compare N_K's features through its (complete) head.
    assert _feature_error(plain, base, test, 2) > 0.01
    assert _feature_error(refitted, base, test, 2) < 1e-4
    assert_paths_agree(refitted, test, export=True)


@pytest.mark.parametrize("settings", [dict(exact=True), dict(exact=False, copy_fraction=0.5)])
def test_refit_lowers_the_error_of_every_exit_and_keeps_the_properties(images, settings):
    calib = torch.randn(32, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    base = toy(nn.ReLU).eval()
    plain, refitted = (nested_toy(calib=calib, compensate=flag, **settings) for flag in (False, True))
    assert refitted.rdn_config["compensate"] and not plain.rdn_config["compensate"]
    full = refitted.num_subnets
    with torch.no_grad():
        if settings["exact"]:  # complete copies are left as surgery made them: N_K is still the base network
            assert torch.equal(refitted(images, subnet=full), plain(images, subnet=full))
            torch.testing.assert_close(refitted(images, subnet=full), base(images), atol=1e-5, rtol=1e-5)
    errors = [(_feature_error(plain, base, calib, s), _feature_error(refitted, base, calib, s)) for s in range(1, full)]
    assert all(after < before for before, after in errors), errors
    assert_paths_agree(refitted, images, export=True)


def test_refit_keeps_the_nesting(images):
    net = nested_toy(exact=False, copy_fraction=0.5, compensate=True)
    assert_earlier_subnets_ignore_later_groups(net, images)


def test_refit_after_pruning_reads_only_the_kept_blocks():
    net = nested_toy(exact=False, mac_budget=1.2, compensate=True)
    for name, pruned in net.rdn_config["pruned_blocks"].items():
        layer = net.layers[name]
        for out_group, in_group in pruned:
            rows = slice(layer.layout.out_offsets[out_group], layer.layout.out_offsets[out_group + 1])
            columns = slice(layer.layout.in_offsets[in_group], layer.layout.in_offsets[in_group + 1])
            assert not layer.weight[rows, columns].any()
    assert net.rdn_config["pruned_blocks"]


def test_bad_settings_are_named():
    with pytest.raises(TypeError, match="compensate must be a bool"):
        nested_toy(compensate="yes")
    with pytest.raises(ValueError, match="copies='latest'"):
        nested_toy(copies="sum", compensate=True)
    net = nested_toy()
    with pytest.raises(ValueError, match="shrinkage must be a positive number"):
        compensate_dropped_connections(net, toy(nn.ReLU), torch.randn(2, 3, 10, 10), shrinkage=0.0)


def test_old_configs_mean_no_refit():
    from rdn.surgery import RussianDollNet

    net = nested_toy(exact=False, copy_fraction=0.5)
    config = {key: value for key, value in net.rdn_config.items() if key != "compensate"}
    rebuilt = RussianDollNet.from_config(config, toy(nn.ReLU))
    assert rebuilt.rdn_config["compensate"] is False


def test_a_bias_free_layer_s_intercept_goes_into_the_reading_batch_norm():
    """conv (no bias) → BN: after the refit, every refitted copy channel's BN input minus its running mean
    has the mean, over the calibration images, of the base layer's output minus the base BN's mean."""
    from rdn.surgery.passes.compensate import _reading_batch_norm

    calib = torch.randn(16, 3, 10, 10, generator=torch.Generator().manual_seed(4))
    base = toy().eval()
    net = nest(base, k=3, calib=calib, skip=["stem"], mac_budget=None, copy_fraction=0.5, compensate=True).eval()
    name = "body_2_conv_0"  # the first block's 1×1 expand conv (no bias), read by a BN
    layer, norm = net.layers[name], _reading_batch_norm(net, name)
    assert layer.bias is None and norm is not None
    base_conv, base_norm = base.body[2].conv[0], base.body[2].conv[1]
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, a, out: seen.__setitem__("rdn", out)),
             base_conv.register_forward_hook(lambda m, a, out: seen.__setitem__("base", out))]  # fmt: skip
    with torch.no_grad():
        net(calib, subnet=net.num_subnets), base(calib)
    for hook in hooks:
        hook.remove()
    _, out_space = net.nested_spaces(name)
    refitted = [c for c in range(len(out_space)) if norm.running_mean[c] != base_norm.running_mean[out_space.source[c]]]
    assert refitted  # some copies missed inputs and took an intercept
    for c in refitted:
        source = int(out_space.source[c])
        ours = seen["rdn"][:, c].mean().double() - norm.running_mean[c].double()
        theirs = seen["base"][:, source].mean().double() - base_norm.running_mean[source].double()
        assert abs(float(ours - theirs)) < 1e-3 * (1 + abs(float(theirs)))
