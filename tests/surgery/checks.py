"""Helpers the surgery tests share: a relative error and the staged walk over the exits."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from rdn.surgery import RussianDollNet, StagedState


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def staged_states(rdn: RussianDollNet, images: torch.Tensor) -> Iterator[tuple[int, StagedState]]:
    """(exit e, state after exit e) for e = 1..num_subnets: ``start`` on ``images``, then ``step``."""
    state = rdn.start(images)
    yield 1, state
    for subnet in range(2, rdn.num_subnets + 1):
        state = rdn.step(state)
        yield subnet, state


def assert_paths_agree(rdn: RussianDollNet, images: torch.Tensor, export: bool = False, tolerance: float = 1e-5):
    """Every exit computed alone equals the one-pass output and the staged path (and its export)."""
    with torch.no_grad():
        one_pass = rdn(images)
        for subnet, state in staged_states(rdn, images):
            alone = rdn(images, subnet=subnet)
            torch.testing.assert_close(one_pass[subnet - 1], alone, atol=tolerance, rtol=tolerance)
            torch.testing.assert_close(state.logits, alone, atol=tolerance, rtol=tolerance)
            if export:
                exported = rdn.export(subnet).eval()
                torch.testing.assert_close(exported(images), alone, atol=tolerance, rtol=tolerance)
