"""Surgery on a CUDA device: the RDN runs there with the default kernel backend."""

from __future__ import annotations

import pytest
import torch

from rdn.models import create
from rdn.surgery import nest
from tests.surgery.checks import relative_error, staged_states

pytestmark = pytest.mark.cuda


@pytest.fixture
def device() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnext_small"])
def test_rdn_on_cuda_matches_base_and_staged_path(device, name):
    torch.manual_seed(0)
    model = create(name, num_classes=10, input_size=32, width_mult=0.5).to(device).eval()
    images = torch.randn(4, 3, 32, 32, device=device)
    rdn = nest(model, k=4, calib=images, depth_split=4).eval()
    with torch.no_grad():
        expected = model(images)
        logits = rdn(images)
        assert all(out.device.type == "cuda" for out in logits)
        assert relative_error(logits[-1], expected) < 1e-3  # TF32 convs on the GPU
        for subnet, state in staged_states(rdn, images):
            alone = rdn(images, subnet=subnet)
            torch.testing.assert_close(alone, logits[subnet - 1], atol=1e-3, rtol=1e-3)
            torch.testing.assert_close(state.logits, alone, atol=1e-3, rtol=1e-3)
        exported = rdn.export(3).eval()
        torch.testing.assert_close(exported(images), rdn(images, subnet=3), atol=1e-3, rtol=1e-3)


def _concat_and_norm_models():
    from tests.surgery.test_coverage import _concat_model, _convnext

    return {
        "ghost": (lambda: _concat_model("ghost"), {"skip": ["stem"]}, 12),
        "dense": (lambda: _concat_model("dense"), {"skip": ["stem"]}, 12),
        "convnext_grouped_norms": (_convnext, {"skip": 0, "norms": "grouped"}, 16),
    }


def check_on(device: torch.device, name: str) -> None:
    """Concatenations and grouped norms on ``device``: one pass = alone = staged, export, N_K = base."""
    make, options, size = _concat_and_norm_models()[name]
    model = make().to(device).eval()
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    rdn = nest(model, k=3, calib=images, **options).eval()
    with torch.no_grad():
        logits = rdn(images)
        assert relative_error(logits[-1], model(images)) < 1e-3  # TF32 convs on the GPU
        for subnet, state in staged_states(rdn, images):
            alone = rdn(images, subnet=subnet)
            torch.testing.assert_close(alone, logits[subnet - 1], atol=1e-3, rtol=1e-3)
            torch.testing.assert_close(state.logits, alone, atol=1e-3, rtol=1e-3)
            exported = rdn.export(subnet).eval()
            torch.testing.assert_close(exported(images), alone, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("name", ["ghost", "dense", "convnext_grouped_norms"])
def test_concatenations_and_grouped_norms_on_cuda(device, name):
    check_on(device, name)
