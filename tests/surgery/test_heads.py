"""Full-depth heads: alignment and shared classifier applied folded (``ExitAlignment``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rdn.surgery.network import ExitAlignment


def _head(features: int = 12, width: int = 16, classes: int = 5, dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    alignment = ExitAlignment(features, width, bias=False, dtype=dtype)
    classifier = nn.Linear(width, classes, dtype=dtype)
    with torch.no_grad():
        alignment.weight.copy_(torch.randn(alignment.weight.shape, generator=generator, dtype=dtype))
    return alignment, classifier


@pytest.mark.parametrize("batch", [1, 5, 6, 32])  # at most and more than C = 5 classes
@pytest.mark.parametrize("grad", [True, False])
def test_folded_logits_equal_the_chain(batch, grad):
    alignment, classifier = _head()
    features = torch.randn(batch, 12, dtype=torch.float64, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        logits = alignment(features, classifier)
    expected = classifier(alignment(features))
    torch.testing.assert_close(logits, expected)
    if grad:
        weight = torch.randn_like(logits)
        got = torch.autograd.grad((logits * weight).sum(), (features, alignment.weight, classifier.weight))
        want = torch.autograd.grad((expected * weight).sum(), (features, alignment.weight, classifier.weight))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)


class _Exit(nn.Module):
    def __init__(self, alignment: ExitAlignment, classifier: nn.Linear) -> None:
        super().__init__()
        self.alignment, self.classifier = alignment, classifier

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.alignment(features, self.classifier)


def test_gradcheck_of_the_folded_path():
    exit_ = _Exit(*_head(features=4, width=6, classes=3))
    names = ["alignment.weight", "classifier.weight", "classifier.bias"]
    parameters = dict(exit_.named_parameters())
    inputs = [torch.randn(8, 4, dtype=torch.float64)] + [parameters[name].detach() for name in names]

    def logits(features, *weights):
        return torch.func.functional_call(exit_, dict(zip(names, weights, strict=True)), (features,))

    assert torch.autograd.gradcheck(logits, tuple(t.requires_grad_() for t in inputs))


def test_inference_product_follows_weight_updates_and_conversions():
    alignment, classifier = _head()
    features = torch.randn(3, 12, dtype=torch.float64)
    with torch.no_grad():
        first = alignment(features, classifier)
        assert torch.equal(alignment(features, classifier), first)  # reused
        alignment.weight.mul_(2)  # an optimiser step / load_state_dict writes in place
        torch.testing.assert_close(alignment(features, classifier), classifier(alignment(features)))
        classifier.weight.add_(1)
        torch.testing.assert_close(alignment(features, classifier), classifier(alignment(features)))
        alignment.float(), classifier.float()
        got = alignment(features.float(), classifier)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, classifier(alignment(features.float())))


def test_folded_layer_is_one_linear():
    alignment, classifier = _head()
    folded = alignment.folded(classifier)
    assert type(folded) is nn.Linear and folded.weight.shape == (5, 12)
    features = torch.randn(4, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(features), classifier(alignment(features)))
