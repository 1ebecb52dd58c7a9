"""How much of a base model a surgery nested: the coverage report of an RDN's plan.

A layer is *nested* when its work is split over the K channel groups (nested convs and linear
layers, grouped convs and per-channel modules on nested tensors: N_1 computes a part of it), and
*un-nested* when N_1 computes all of it (skipped layers, and layers whose channels must stay whole
because of a node that couples them). The shares are of the base model's conv / linear MACs (the
convention of :mod:`rdn.models.profile`) and of its parameters, at the calibration input size;
the classifier, which the heads replace, counts as nested.

``nest`` warns (:class:`CoverageWarning`) when less than :data:`LOW_COVERAGE` of the MACs is
nested, naming the causes; ``net.coverage()`` gives the whole report.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from rdn.surgery.plan import SKIPPED_REASON, ChannelParamsLayer, FixedLayer, GroupedLayer, NestedStepLayer, Plan, Step

__all__ = ["LOW_COVERAGE", "Coverage", "CoverageWarning", "LayerCoverage", "coverage"]

# Below this share of the base model's MACs in nested layers, nest() warns.
LOW_COVERAGE = 0.5


class CoverageWarning(UserWarning):
    """Little of the model was nested: early exits can save little (the message says why)."""


@dataclass(frozen=True)
class LayerCoverage:
    """One layer of the base model with parameters or MACs.

    Attributes:
        name: the traced node (a key of ``RussianDollNet.layers``); module: its qualified name.
        macs, params: the base layer's, per sample at the calibration input size.
        nested: whether its work is split over the groups.
        why: for an un-nested layer, why (the skip, or the node and what it does).
    """

    name: str
    module: str
    macs: int
    params: int
    nested: bool
    why: str | None = None


@dataclass(frozen=True)
class Coverage:
    """The coverage of one RDN (module docstring)."""

    layers: tuple[LayerCoverage, ...]
    classifier_macs: int
    classifier_params: int
    after_classifier: tuple[str, ...] = ()

    @property
    def total_macs(self) -> int:
        """The base model's conv / linear MACs per sample (classifier included)."""
        return sum(layer.macs for layer in self.layers) + self.classifier_macs

    @property
    def nested_macs(self) -> int:
        return sum(layer.macs for layer in self.layers if layer.nested) + self.classifier_macs

    @property
    def total_params(self) -> int:
        return sum(layer.params for layer in self.layers) + self.classifier_params

    @property
    def nested_params(self) -> int:
        return sum(layer.params for layer in self.layers if layer.nested) + self.classifier_params

    @property
    def mac_share(self) -> float:
        """Share of the base model's MACs in nested layers (0..1)."""
        return self.nested_macs / self.total_macs if self.total_macs else 0.0

    @property
    def param_share(self) -> float:
        """Share of the base model's parameters in nested layers (0..1)."""
        return self.nested_params / self.total_params if self.total_params else 0.0

    def causes(self) -> list[tuple[str, int, list[str]]]:
        """(why, MACs, modules) of the un-nested conv / linear layers (grouped convs included), grouped by
        why, most MACs first: their MACs add up to the un-nested ones."""
        grouped: dict[str, list[LayerCoverage]] = defaultdict(list)
        for layer in self.layers:
            if not layer.nested and layer.macs:
                grouped[layer.why or "un-nested"].append(layer)
        rows = [(why, sum(layer.macs for layer in layers), [layer.module for layer in layers])
                for why, layers in grouped.items()]  # fmt: skip
        return sorted(rows, key=lambda row: -row[1])

    def summary(self) -> str:
        """One line: the shares and the number of nested conv / linear layers."""
        counted = [layer for layer in self.layers if layer.macs]  # conv / linear layers
        nested = sum(layer.nested for layer in counted)
        return (
            f"{100 * self.mac_share:.0f} % of the base model's MACs ({_amount(self.nested_macs)} of "
            f"{_amount(self.total_macs)}) and {100 * self.param_share:.0f} % of its parameters are in nested "
            f"layers ({nested} of {len(counted)} conv / linear layers, the classifier aside)"
        )

    def report(self, most: int = 8) -> str:
        """Markdown: the summary, then what keeps the rest un-nested (``most`` causes at most)."""
        lines = [f"Coverage: {self.summary()}."]
        if self.after_classifier:
            dropped = ", ".join(self.after_classifier)
            lines.append(f"Dropped after the classifier (the heads give the logits): {dropped}.")
        causes = self.causes()
        if causes:
            lines += ["", "| un-nested because | layers | MACs (M) | share of MACs |", "|---|---|---|---|"]
            for why, macs, modules in causes[:most]:
                listed = ", ".join(modules[:4]) + (f", {len(modules) - 4} more" if len(modules) > 4 else "")
                share = macs / self.total_macs if self.total_macs else 0.0
                lines.append(f"| {why} | {listed} | {macs / 1e6:.3f} | {100 * share:.1f} % |")
            if len(causes) > most:
                lines.append(f"| {len(causes) - most} more causes | | | |")
        return "\n".join(lines)

    def warning(self) -> str | None:
        """The text ``nest`` warns with when less than :data:`LOW_COVERAGE` of the MACs is nested, else None."""
        if self.mac_share >= LOW_COVERAGE:
            return None
        causes = self.causes()
        named = "; ".join(f"{why} ({100 * macs / self.total_macs:.0f} % of the MACs)" for why, macs, _ in causes[:3])
        fix = ""
        skipped = sum(macs for why, macs, _ in causes if why == SKIPPED_REASON)
        if skipped >= 0.25 * self.total_macs:
            fix = " The skipped layers hold much of it: skip=0 (or fewer skipped layers) nests them."
        return (
            f"little of the model is nested: {self.summary()}, so early exits can save little. "
            f"What keeps the rest un-nested: {named}.{fix} net.coverage().report() lists every cause."
        )


def _amount(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 100_000 else f"{count / 1e3:.1f}K"


def _base_costs(step: Step) -> tuple[int, int]:
    """(MACs, params) per sample of the base layer a step was made from (before inflation)."""
    layer = step.layer
    spatial = math.prod(step.shape[2:]) if step.shape is not None else 1
    if isinstance(layer, NestedStepLayer):
        weights = step.input_space.channels * step.space.channels * layer.kernel
        return weights * spatial, weights + (step.space.channels if layer.bias else 0)
    if isinstance(layer, GroupedLayer):
        weights = step.space.channels * layer.group_inputs * layer.kernel
        return weights * spatial, weights + (step.space.channels if layer.bias else 0)
    if isinstance(layer, ChannelParamsLayer):
        return 0, step.space.channels * layer.channel_tensors + layer.scalar_params
    if isinstance(layer, FixedLayer):
        return layer.macs, layer.params
    return 0, 0


def coverage(plan: Plan) -> Coverage:
    """The coverage report of ``plan`` (module docstring)."""
    reasons = dict(plan.unnested)
    layers = []
    for step in plan.layer_steps():
        macs, params = _base_costs(step)
        if not macs and not params:
            continue
        nested = not isinstance(step.layer, FixedLayer)
        layers.append(LayerCoverage(step.name, step.module, macs, params, nested, reasons.get(step.name)))
    heads = plan.heads
    weights = heads.feature_width * heads.num_classes
    return Coverage(tuple(layers), weights, weights + (heads.num_classes if heads.bias else 0), plan.after_classifier)
