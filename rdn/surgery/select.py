"""Which output channels go to the early groups: greedy select (paper Algorithm 1) or random.

For every space a nested layer defines, the selection orders its units; the first
``primary_sizes[0]`` units form primary group 0 (seen by N_1), and so on. The order is the space's
layout, so it is also the input permutation of every layer that reads the space.

Greedy scores are energies on the calibration data, so the data and every activation it gives
must be finite (:func:`calibration_batch`, :func:`check_activations`): NaN scores would sort
anywhere and empty data would score every unit 0. Where the scores still tie at a group's cut
(typically 0 everywhere: the layer reads an un-nested tensor, which N_1 sees whole, so any order
is optimal), the unit index decides; :func:`select_orders` reports those groups and ``nest``
records them in ``rdn_config["ties"]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from rdn.models.profile import eval_mode
from rdn.surgery.graph import SurgeryGraph, describe_node, trace

CALIB_EXPECTED = (
    "calib must be a non-empty floating-point tensor (N, C, H, W) with N >= 1 and finite values, or a "
    "DataLoader / iterable of such batches"
)


def check_finite_calibration(batch: Tensor) -> None:
    """Raise ValueError naming ``calib`` when ``batch`` (N, ...) has no sample or a NaN / inf value."""
    if batch.shape[0] == 0:
        raise ValueError(f"calib holds no sample (shape {tuple(batch.shape)}): {CALIB_EXPECTED}")
    finite = torch.isfinite(batch)
    if not finite.all():
        bad = ~finite.flatten(1).all(1)
        samples = bad.nonzero().flatten().tolist()
        listed = f"{samples[:8]}{'...' if len(samples) > 8 else ''}"
        raise ValueError(
            f"calib holds {int((~finite).sum())} non-finite value(s) (NaN or inf) in sample(s) {listed}: "
            f"{CALIB_EXPECTED}"
        )


def calibration_batch(calib) -> Tensor:
    """One tensor (N, ...) from a tensor or an iterable of batches (tensors or (input, target) pairs),
    checked non-empty and finite (:data:`CALIB_EXPECTED`)."""
    if isinstance(calib, Tensor):
        batches = [calib]
    elif isinstance(calib, Iterable) and not isinstance(calib, (str, bytes)):
        batches = [batch[0] if isinstance(batch, (tuple, list)) else batch for batch in calib]
    else:
        raise TypeError(f"{CALIB_EXPECTED}; got {type(calib).__name__}")
    if not batches:
        raise ValueError(f"calib is empty (no batch): {CALIB_EXPECTED}")
    for batch in batches:
        if not isinstance(batch, Tensor) or not batch.is_floating_point():
            got = f"{batch.dtype} of shape {tuple(batch.shape)}" if isinstance(batch, Tensor) else type(batch).__name__
            raise TypeError(f"calib batches must be floating tensors (N, C, H, W), got {got}")
        if batch.dim() < 2:
            raise ValueError(f"{CALIB_EXPECTED}; got shape {tuple(batch.shape)}")
    shapes = {tuple(batch.shape[1:]) for batch in batches}
    if len(shapes) != 1:
        raise ValueError(f"calib batches must share one sample shape, got {sorted(shapes)}")
    batch = torch.cat(batches) if len(batches) > 1 else batches[0]
    check_finite_calibration(batch)
    return batch


class _FiniteRun(fx.Interpreter):
    """Runs a traced model and refuses the first node whose output is not finite.

    Its inputs were finite (checked before), so that node is where the NaN / inf comes from.
    """

    def __init__(self, graph_module: fx.GraphModule) -> None:
        super().__init__(graph_module)
        self.named_modules = dict(graph_module.named_modules())

    def run_node(self, node: fx.Node) -> Any:
        result = super().run_node(node)
        if isinstance(result, Tensor) and result.is_floating_point() and not torch.isfinite(result).all():
            raise ValueError(self._non_finite_message(node))
        return result

    def _non_finite_message(self, node: fx.Node) -> str:
        module = self.named_modules.get(node.target) if node.op == "call_module" else None
        tensors = [] if module is None else [*module.named_parameters(), *module.named_buffers()]
        broken = [name for name, t in tensors if t.is_floating_point() and not torch.isfinite(t).all()]
        cause = f"its {', '.join(broken)} holds NaN or inf" if broken else "it overflows or divides by zero"
        return (
            f"calib gives non-finite values (NaN or inf) at {describe_node(node, self.named_modules)}, whose "
            f"inputs are finite: {cause}. Surgery scores channels and blocks with these activations "
            "(greedy select, mac_budget, compensate) and needs them finite"
        )


@torch.no_grad()
def check_activations(model: nn.Module, calib: Tensor) -> None:
    """Run ``model`` (a module, traced here, or its ``fx.GraphModule``) on ``calib`` in eval mode;
    ValueError naming the first node whose output is not finite."""
    graph_module = model if isinstance(model, fx.GraphModule) else trace(model)
    with eval_mode(graph_module):
        _FiniteRun(graph_module).run(calib)


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


def definers(graph: SurgeryGraph) -> dict[str, str]:
    """First nested writer (graph order) of every layout → that layout, whose order its selection decides."""
    return {graph.layout_writers(layout)[0]: layout for layout in graph.layouts}


class Selection(NamedTuple):
    """:func:`select_orders`' result."""

    orders: dict[str, list[int]]  # unit order of every layout
    ties: dict[str, list[int]]  # greedy: layout → primary groups its unit index decided (GreedyOrder)


def select_orders(graph: SurgeryGraph, calib: Tensor, select: str, seed: int) -> Selection:
    """Unit order of every layout: ``select`` = "greedy" (Algorithm 1 on ``calib``, whose activations must
    be finite: :func:`check_activations`) or "random" (seeded)."""
    chosen = definers(graph)
    if select == "random":
        generator = torch.Generator().manual_seed(seed)
        layouts = sorted(chosen.values(), key=graph.position)
        return Selection({layout: torch.randperm(graph.unit_counts[layout], generator=generator).tolist()
                          for layout in layouts}, {})  # fmt: skip
    orders: dict[str, list[int]] = {}
    ties: dict[str, list[int]] = {}

    class _Selecting(_FiniteRun):
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
    return Selection(orders, ties)
