"""Selection pass: which output channels go to the early groups, greedy (paper Algorithm 1) or random.

For every channel layout (:meth:`SurgeryGraph.layout_definers`: the first nested layer writing
it), the selection orders its units; the first ``primary_sizes[0]`` units form primary group 0
(seen by N_1), and so on. The order is the layout, so it is also the input permutation of every
layer that reads it. The pass runs on the analysed graph, before the plan exists: the plan's
channel spaces are made from its orders.

Greedy scores are energies on the calibration data, which must be finite
(:mod:`rdn.surgery.calibration`). Where the scores still tie at a group's cut (typically 0
everywhere: the layer reads an un-nested tensor, which N_1 sees whole, so any order is optimal),
the unit index decides; :func:`select_orders` reports those groups and ``nest`` records them in
``NestRecord.ties``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from rdn.surgery.calibration import FiniteRun
from rdn.surgery.graph import SurgeryGraph

__all__ = ["GreedyOrder", "Selection", "greedy_order", "invisible_energy", "select_orders"]


def invisible_energy(layer: nn.Module, x: Tensor, invisible: Tensor) -> Tensor:
    """(d,): Σ over the batch and pixels of (W[:, invisible] ⊗ X[invisible])², per output channel.

    Args:
        layer: the base ``nn.Conv2d`` (groups = 1) or ``nn.Linear``.
        x: its calibration input (N, c, H, W) or (N, c).
        invisible: (c,) bool, the input channels the sub-network cannot see.
    """
    masked = x * invisible.view(1, -1, *(1,) * (x.dim() - 2)).to(x.dtype)
    with torch.no_grad():
        if isinstance(layer, nn.Conv2d):  # zero padding: other padding modes are refused when nesting
            geometry = (layer.stride, layer.padding, layer.dilation, layer.groups)
            contribution = F.conv2d(masked, layer.weight, None, *geometry)
        else:
            contribution = F.linear(masked, layer.weight)
    dims = [d for d in range(contribution.dim()) if d != 1]
    return contribution.double().pow(2).sum(dims)


class GreedyOrder(NamedTuple):
    """:func:`greedy_order`'s result."""

    order: list[int]  # unit indices in nesting order
    tied_groups: list[int]  # primary groups whose cut the scores did not decide (the unit index did)


def greedy_order(
    layer: nn.Module, x: Tensor, input_groups: Tensor, unit: int, sizes: tuple[int, ...], copies_first: bool = False
) -> GreedyOrder:
    """Paper Algorithm 1 over units: for g = 0..k-2 take the ``sizes[g]`` remaining units whose
    outputs get the least energy from the inputs N_{g+1} cannot see (input primary group > g).

    Args:
        input_groups: (c,) long, the primary group of every original input channel.
        unit: output channels per unit; sizes: units per primary group.
        copies_first: within each group, put the units that lose the most energy first (when only
            some units get copies, ``ChannelSpace.copied``, those are the ones that do).
    Returns the unit order (ties keep the original order) and the groups where a tie at the cut let
    the unit index decide which units got in (all scores equal, e.g. 0 when N_{g+1} sees every input).
    Raises:
        ValueError: when a score is not finite (``x`` or the weights hold NaN / inf).
    """
    remaining = torch.arange(sum(sizes))
    order: list[int] = []
    tied_groups: list[int] = []
    for g, size in enumerate(sizes[:-1]):
        invisible = input_groups > g
        if invisible.any():
            score = invisible_energy(layer, x, invisible).cpu().view(-1, unit).sum(1)[remaining]
        else:  # N_{g+1} sees every input: no unit loses anything
            score = torch.zeros(len(remaining), dtype=torch.float64)
        if not torch.isfinite(score).all():
            raise ValueError(
                f"greedy select: the energies of {type(layer).__name__}'s outputs are non-finite (its calibration "
                "input or its weights hold NaN or inf)"
            )
        ranked = torch.argsort(score, stable=True)
        picked = ranked[:size]
        if size < len(ranked) and score[ranked[size - 1]] == score[ranked[size]]:
            tied_groups.append(g)
        if copies_first:
            picked = picked[torch.argsort(score[picked], descending=True, stable=True)]
        order += remaining[picked].tolist()
        keep = torch.ones(len(remaining), dtype=torch.bool)
        keep[picked] = False
        remaining = remaining[keep]
    return GreedyOrder(order + remaining.tolist(), tied_groups)


class Selection(NamedTuple):
    """:func:`select_orders`' result."""

    orders: dict[str, list[int]]  # unit order of every layout
    ties: dict[str, list[int]]  # greedy: layout → primary groups its unit index decided (GreedyOrder)


def select_orders(graph: SurgeryGraph, calib: Tensor, select: str, seed: int) -> Selection:
    """Unit order of every layout: ``select`` = "greedy" (Algorithm 1 on ``calib``, whose activations must
    be finite: :func:`check_activations`) or "random" (seeded)."""
    chosen = graph.layout_definers()
    if select == "random":
        generator = torch.Generator().manual_seed(seed)
        layouts = sorted(chosen.values(), key=graph.position)
        orders = {layout: torch.randperm(graph.unit_counts[layout], generator=generator).tolist() for layout in layouts}
        return Selection(_with_index_orders(graph, orders), {})
    orders: dict[str, list[int]] = {}
    ties: dict[str, list[int]] = {}

    class _Selecting(FiniteRun):
        def run_node(self, node: fx.Node):
            layout = chosen.get(node.name)
            if layout is None:
                return super().run_node(node)
            args, _ = self.fetch_args_kwargs_from_env(node)
            result = super().run_node(node)  # refuses a non-finite output first, naming the layer
            info = graph.infos[node.name]
            input_space = graph.space(graph.space_of(info.inputs[0]), orders)
            selected = greedy_order(
                info.module,
                args[0],
                input_space.primary_group_of_channel.to(args[0].device),
                graph.units[graph.space_of(node.name)],
                graph.primary_sizes(layout),
                copies_first=graph.copy_fraction < 1,
            )
            orders[layout] = selected.order
            if selected.tied_groups:
                ties[layout] = selected.tied_groups
            return result

    with torch.no_grad():
        _Selecting(graph.graph_module).run(calib)
    return Selection(_with_index_orders(graph, orders), ties)


def _with_index_orders(graph: SurgeryGraph, orders: dict[str, list[int]]) -> dict[str, list[int]]:
    """``orders`` and, for layouts without a definer (written only as parts of concatenations), the
    index order, every layout in graph order."""
    return {layout: orders.get(layout, list(range(graph.unit_counts[layout]))) for layout in graph.layouts}
