"""Surgery on every base model of ``rdn.models`` (small-input variants, narrow widths, CPU)."""

from __future__ import annotations

import pytest
import torch

from rdn.models import create, list_models
from rdn.surgery import RussianDollNet, nest
from tests.surgery.checks import relative_error, staged_states

ATOL = 1e-4
BASE = {"num_classes": 10, "input_size": 32, "in_chans": 3}
WIDTHS = {"resnext50_32x4d": 0.25}


def base_arguments(name: str) -> dict:
    return {"name": name, **BASE, "width_mult": WIDTHS.get(name, 0.5)}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=list_models())
def model_and_rdn(request, images):
    torch.manual_seed(0)
    arguments = base_arguments(request.param)
    model = create(**arguments).eval()
    return model, nest(model, k=4, calib=images, exact=True, base=arguments).eval()


def test_one_pass_staged_and_exact_top(model_and_rdn, images):
    """P2, the staged path, and copies="latest": N_K reproduces the base model before fine-tuning."""
    model, rdn = model_and_rdn
    assert rdn.num_subnets == 7
    with torch.no_grad():
        logits = rdn(images)
        assert relative_error(logits[-1], model(images)) < 1e-4
        for s, state in staged_states(rdn, images):
            alone = rdn(images, subnet=s)
            torch.testing.assert_close(alone, logits[s - 1], atol=ATOL, rtol=ATOL)
            torch.testing.assert_close(state.logits, alone, atol=ATOL, rtol=ATOL)


def test_costs_grow_with_the_subnet(model_and_rdn):
    _, rdn = model_and_rdn
    macs = [rdn.macs(s) for s in range(1, rdn.num_subnets + 1)]
    params = [rdn.params(s) for s in range(1, rdn.num_subnets + 1)]
    memory = [rdn.peak_activation_bytes(s) for s in range(1, rdn.num_subnets + 1)]
    assert macs == sorted(macs) and macs[0] < macs[-1]
    assert params == sorted(params) and params[0] < params[-1]
    assert memory == sorted(memory)


def test_export_and_rebuild_from_config(model_and_rdn, images):
    """P5 on the smallest and the largest sub-network, and the state_dict round trip without the model."""
    _, rdn = model_and_rdn
    with torch.no_grad():
        for s in (1, rdn.num_subnets):
            torch.testing.assert_close(rdn.export(s).eval()(images), rdn(images, subnet=s), atol=ATOL, rtol=ATOL)
        rebuilt = RussianDollNet.from_config(rdn.rdn_config)
        rebuilt.load_state_dict(rdn.state_dict())
        rebuilt.eval()
        torch.testing.assert_close(rebuilt(images, subnet=3), rdn(images, subnet=3), atol=0, rtol=0)


def test_expand_beats_truncate_on_mobilenet_v2(images):
    """P3 on a real model: N_K error expand < truncate (copies="latest": expand is exact)."""
    torch.manual_seed(0)
    model = create(**base_arguments("mobilenet_v2")).eval()
    with torch.no_grad():
        expected = model(images)
        errors = {
            mode: relative_error(nest(model, k=4, mode=mode, calib=images).eval()(images)[-1], expected)
            for mode in ("expand", "truncate")
        }
    assert errors["expand"] < errors["truncate"]


def test_depth_split_on_mobilenet_v2(images):
    """7 → 14 exits: every shallow exit is computed by one pass, alone, and by the staged walk alike."""
    torch.manual_seed(0)
    model = create(**base_arguments("mobilenet_v2")).eval()
    rdn = nest(model, k=4, calib=images, depth_split=8).eval()
    assert rdn.num_subnets == 14
    with torch.no_grad():
        logits = rdn(images)
        for subnet, state in staged_states(rdn, images):
            torch.testing.assert_close(state.logits, logits[subnet - 1], atol=ATOL, rtol=ATOL)
    # The shallow exit of N_s (2s - 1) is cheaper than N_s (2s).
    assert rdn.macs(1) < rdn.macs(2) and rdn.macs(13) < rdn.macs(14)
