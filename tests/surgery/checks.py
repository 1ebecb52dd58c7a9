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
