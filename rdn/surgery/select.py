"""Which output channels go to the early groups: greedy select (paper Algorithm 1) or random.

For every space a nested layer defines, the selection orders its units; the first
``primary_sizes[0]`` units form primary group 0 (seen by N_1), and so on. The order is the space's
layout, so it is also the input permutation of every layer that reads the space.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from rdn.surgery.graph import SurgeryGraph


def calibration_batch(calib) -> Tensor:
    """One tensor (N, ...) from a tensor or an iterable of batches (tensors or (input, target) pairs)."""
    if isinstance(calib, Tensor):
        batches = [calib]
    elif isinstance(calib, Iterable) and not isinstance(calib, (str, bytes)):
        batches = [batch[0] if isinstance(batch, (tuple, list)) else batch for batch in calib]
    else:
        raise TypeError(
            f"calib must be a tensor (N, C, H, W) or a DataLoader / iterable of batches, got {type(calib).__name__}"
        )
    if not batches:
        raise ValueError("calib is empty: give at least one calibration batch")
    for batch in batches:
        if not isinstance(batch, Tensor) or not batch.is_floating_point() or batch.dim() < 2:
            raise TypeError(
                "calib batches must be floating tensors (N, C, ...), got "
                + (
                    f"{batch.dtype} of shape {tuple(batch.shape)}"
                    if isinstance(batch, Tensor)
                    else type(batch).__name__
                )
            )
    shapes = {tuple(batch.shape[1:]) for batch in batches}
    if len(shapes) != 1:
        raise ValueError(f"calib batches must share one sample shape, got {sorted(shapes)}")
    return torch.cat(batches) if len(batches) > 1 else batches[0]


def invisible_energy(layer: nn.Module, x: Tensor, invisible: Tensor) -> Tensor:
    """(d,): Σ over the batch and pixels of (W[:, invisible] ⊗ X[invisible])², per output channel.

    Args:
        layer: the base ``nn.Conv2d`` (groups = 1) or ``nn.Linear``.
        x: its calibration input (N, c, H, W) or (N, c).
        invisible: (c,) bool, the input channels the sub-network cannot see.
    """
    masked = x * invisible.view(1, -1, *(1,) * (x.dim() - 2)).to(x.dtype)
    with torch.no_grad():
        if isinstance(layer, nn.Conv2d):
            contribution = layer._conv_forward(masked, layer.weight, None)
        else:
            contribution = F.linear(masked, layer.weight)
    dims = [d for d in range(contribution.dim()) if d != 1]
    return contribution.double().pow(2).sum(dims)


def greedy_order(
    layer: nn.Module, x: Tensor, input_groups: Tensor, unit: int, sizes: tuple[int, ...], copies_first: bool = False
) -> list[int]:
    """Paper Algorithm 1 over units: for g = 0..k-2 take the ``sizes[g]`` remaining units whose
    outputs get the least energy from the inputs N_{g+1} cannot see (input primary group > g).

    Args:
        input_groups: (c,) long, the primary group of every original input channel.
        unit: output channels per unit; sizes: units per primary group.
        copies_first: within each group, put the units that lose the most energy first (when only
            some units get copies, ``ChannelSpace.copied``, those are the ones that do).
    Returns the unit order (ties keep the original order).
    """
    remaining = torch.arange(sum(sizes))
    order: list[int] = []
    for g, size in enumerate(sizes[:-1]):
        invisible = input_groups > g
        if invisible.any():
            score = invisible_energy(layer, x, invisible).cpu().view(-1, unit).sum(1)[remaining]
        else:
            score = torch.zeros(len(remaining), dtype=torch.float64)
        picked = torch.argsort(score, stable=True)[:size]
        if copies_first:
            picked = picked[torch.argsort(score[picked], descending=True, stable=True)]
        order += remaining[picked].tolist()
        keep = torch.ones(len(remaining), dtype=torch.bool)
        keep[picked] = False
        remaining = remaining[keep]
    return order + remaining.tolist()


def definers(graph: SurgeryGraph) -> dict[str, str]:
    """First nested writer (graph order) of every layout → that layout, whose order its selection decides."""
    return {graph.layout_writers(layout)[0]: layout for layout in graph.layouts}


def select_orders(graph: SurgeryGraph, calib: Tensor, select: str, seed: int) -> dict[str, list[int]]:
    """Unit order of every layout: ``select`` = "greedy" (Algorithm 1 on ``calib``) or "random" (seeded)."""
    chosen = definers(graph)
    if select == "random":
        generator = torch.Generator().manual_seed(seed)
        return {
            layout: torch.randperm(graph.unit_counts[layout], generator=generator).tolist()
            for layout in sorted(chosen.values(), key=graph.position)
        }
    orders: dict[str, list[int]] = {}

    class _Selecting(fx.Interpreter):
        def run_node(self, node: fx.Node):
            layout = chosen.get(node.name)
            if layout is not None:
                args, _ = self.fetch_args_kwargs_from_env(node)
                info = graph.infos[node.name]
                input_space = graph.space(graph.space_of(info.inputs[0]), orders)
                orders[layout] = greedy_order(
                    info.module,
                    args[0],
                    input_space.primary_group_of_channel.to(args[0].device),
                    graph.units[graph.space_of(node.name)],
                    graph.primary_sizes(layout),
                    copies_first=graph.copy_fraction < 1,
                )
            return super().run_node(node)

    with torch.no_grad():
        _Selecting(graph.graph_module).run(calib)
    return orders
