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


def perturb_later_groups(rdn: RussianDollNet, s: int, generator: torch.Generator) -> None:
    """Overwrite every parameter entry that belongs to groups >= s (0-based) of its layer, and other heads."""
    with torch.no_grad():
        for name, layer in rdn.layers.items():
            step = rdn._by_name[name]
            if step.space is None or step.space.is_single_group:
                continue
            start = step.space.offsets[s]
            for parameter in layer.parameters():
                parameter[start:] = torch.randn(parameter[start:].shape, generator=generator)
            for buffer_name in ("running_mean", "running_var"):
                buffer = getattr(layer, buffer_name, None)
                if buffer is not None:
                    buffer[start:] = torch.rand(buffer[start:].shape, generator=generator) + 0.5
        for index, head in enumerate(rdn.heads):
            if index != s - 1:
                head.weight.copy_(torch.randn(head.weight.shape, generator=generator))


def assert_earlier_subnets_ignore_later_groups(rdn: RussianDollNet, images: torch.Tensor) -> None:
    """P1 on parameters: for every s, perturbing everything of groups >= s leaves N_s's logits bit-equal."""
    generator = torch.Generator().manual_seed(3)
    for s in range(1, rdn.num_subnets):
        with torch.no_grad():
            before = rdn(images, subnet=s)
        perturb_later_groups(rdn, s, generator)
        with torch.no_grad():
            assert torch.equal(rdn(images, subnet=s), before)
