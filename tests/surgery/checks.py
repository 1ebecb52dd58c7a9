"""Helpers the surgery tests share: a relative error, the energy a layer's outputs lose to unseen
inputs, the staged walk over the exits, and the nesting check (later groups never change earlier
sub-networks, through any path)."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdn.surgery import RussianDollNet, StagedState


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def lost_energy(layer: nn.Conv2d | nn.Linear, x: Tensor, invisible: Tensor) -> Tensor:
    """(out_channels,) float64: Σ over the images and pixels of the squared part of each output channel
    that comes from the ``invisible`` input channels ((in_channels,) bool), computed with plain
    ``F.conv2d`` / ``F.linear`` on the masked input (independent of ``rdn.surgery.passes.select``)."""
    masked = (x * invisible.view(1, -1, *(1,) * (x.dim() - 2))).double()
    weight = layer.weight.detach().double()
    with torch.no_grad():
        if isinstance(layer, nn.Conv2d):
            y = F.conv2d(masked, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        else:
            y = F.linear(masked, weight)
    return y.transpose(0, 1).reshape(y.shape[1], -1).pow(2).sum(1)


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


def logits_by_path(rdn: RussianDollNet, images: torch.Tensor, exits: Iterable[int]) -> dict[str, dict[int, Tensor]]:
    """{path: {exit: logits}} of ``exits`` through every way of running them: the one-pass forward,
    ``rdn(images, subnet=e)``, the staged walk (``start`` / ``step``) and ``rdn.export(e)``."""
    exits = sorted(exits)
    with torch.no_grad():
        one_pass = rdn(images)
        staged = {subnet: state.logits for subnet, state in staged_states(rdn, images) if subnet in exits}
        return {
            "one pass": {e: one_pass[e - 1] for e in exits},
            "subnet=e": {e: rdn(images, subnet=e) for e in exits},
            "staged": staged,
            "export": {e: rdn.export(e).eval()(images) for e in exits},
        }


def _randomize(tensor: Tensor, generator: torch.Generator, positive: bool = False) -> None:
    """Overwrite ``tensor`` (a view) in place; ``positive`` for statistics such as BN's running variance."""
    values = (
        torch.rand(tensor.shape, generator=generator) + 0.5
        if positive
        else torch.randn(tensor.shape, generator=generator)
    )
    tensor.copy_(values.to(tensor.dtype))


def _randomize_channels(module: nn.Module, channels: int, start: int, generator: torch.Generator) -> None:
    """Entries ``start:`` of every floating parameter and buffer of ``module`` with ``channels`` rows."""
    for tensors, positive in ((module.parameters(), False), (module.buffers(), True)):
        for tensor in tensors:
            if tensor.is_floating_point() and tensor.dim() and tensor.shape[0] == channels:
                _randomize(tensor[start:], generator, positive)


def perturb_later_layers(rdn: RussianDollNet, s: int, generator: torch.Generator) -> int:
    """Overwrite, in every layer, everything that belongs to the groups >= s (0-based: the groups N_s
    does not have) with random values; returns how many output channels that touched.

    That is every tensor entry of those groups' output channels (parameters and buffers: weight rows,
    biases, BN affine parameters and running statistics, grouped-conv filters) and, in a nested layer,
    the blocks through which earlier output groups would read those input groups (above the block
    diagonal: masked, so never read by a correct layer).
    """
    nested = rdn.nested_layers()
    touched = 0
    with torch.no_grad():
        for name, space in rdn.layer_spaces().items():
            layer, start = rdn.layers[name], space.offsets[s]
            touched += len(space) - start
            _randomize_channels(layer, len(space), start, generator)
            if name in nested:
                _randomize(layer.weight[:start, layer.layout.in_offsets[s] :], generator)
    return touched


def perturb_later_heads(rdn: RussianDollNet, s: int, generator: torch.Generator) -> None:
    """Overwrite the heads and shallow heads of the widths > s (the classifier is shared: it stays)."""
    with torch.no_grad():
        for heads in (rdn.heads, rdn.depth_heads):
            for head in list(heads)[s:]:  # heads[w - 1] belongs to width w
                for tensors, positive in ((head.parameters(), False), (head.buffers(), True)):
                    for tensor in tensors:
                        if tensor.is_floating_point():
                            _randomize(tensor, generator, positive)


def assert_earlier_subnets_ignore_later_groups(rdn: RussianDollNet, images: torch.Tensor, seed: int = 3) -> None:
    """P1: for every width s < K, perturbing everything of groups >= s (0-based; layers and later heads,
    :func:`perturb_later_layers`, :func:`perturb_later_heads`) leaves the logits of every exit of width
    <= s bit-equal through every path (:func:`logits_by_path`), and does move N_K's logits.

    Runs on copies: ``rdn`` is left as it is.
    """
    generator = torch.Generator().manual_seed(seed)
    everything = range(1, rdn.num_subnets + 1)
    before = logits_by_path(rdn, images, everything)
    for s in range(1, rdn.num_groups):
        perturbed = copy.deepcopy(rdn)
        if perturb_later_layers(perturbed, s, generator):
            with torch.no_grad():
                moved = perturbed(images)[-1]
            assert not torch.allclose(moved, before["one pass"][rdn.num_subnets]), (
                f"perturbing groups >= {s} did not change N_K's logits: the perturbation missed the layers"
            )
        perturb_later_heads(perturbed, s, generator)
        kept = [e for e in everything if rdn.exits[e - 1][0] <= s]
        for path, logits in logits_by_path(perturbed, images, kept).items():
            for subnet, value in logits.items():
                assert torch.equal(value, before[path][subnet]), (
                    f"exit {subnet} {rdn.exits[subnet - 1]} through the {path} path changed when the groups >= {s} "
                    "(0-based) were perturbed: an earlier sub-network reads a later group"
                )
