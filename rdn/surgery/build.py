"""From an analysed base model and a record to a plan, and from a plan to the RDN's modules.

:func:`make_plan` writes down what the network executes (:class:`~rdn.surgery.plan.Plan`) from the
graph analysis (:class:`~rdn.surgery.graph.SurgeryGraph`) and a
:class:`~rdn.surgery.record.NestRecord` (orders, pruned blocks). :func:`build_modules` makes the
RDN's layers from the base model's (inflated, nested or copied, DESIGN.md §4) and its heads.
:func:`rebuild` does both for a record and a base model of the same architecture, which is how
``RussianDollNet.from_config`` gets a network without running the surgery again.

Heads (DESIGN.md §4.5): the full-depth exit of width s pools its own feature prefix (F_s channels);
an alignment ``F_s → F`` (the 0/1 matrix summing the copies of each base feature channel,
``copies="sum"``, or picking its latest copy, ``"latest"``) followed by the base classifier
``F → C`` is one linear map, stored and trained folded as ``nn.Linear(F_s, C)``: N_K's head starts
as exactly the base classifier on its features. With a depth split, the shallow exit of width s
maps N_s's channels of the split tensor with a light alignment block (1×1 conv → BN → ReLU →
global average pool, trained from scratch) to F channels; the shallow exits share the classifier.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import NamedTuple

import torch
from torch import nn

from rdn.models import create
from rdn.models.profile import eval_mode
from rdn.nn import GroupedNorm, NestedConv2d, NestedLinear
from rdn.surgery.graph import SurgeryGraph
from rdn.surgery.plan import (
    ChannelParamsLayer,
    FixedLayer,
    GroupedLayer,
    HeadPlan,
    NestedStepLayer,
    Plan,
    Role,
    Step,
    plan_lifetimes,
)
from rdn.surgery.record import NestRecord
from rdn.surgery.spaces import (
    ChannelSpace,
    alignment_weight,
    block_mask,
    inflate_channel_module,
    inflate_grouped_conv,
    nested_parameters,
)
from rdn_kernels import make_layout

__all__ = ["Modules", "build_modules", "make_plan", "rebuild", "trace_base"]


def _kernel(module: nn.Module) -> int:
    return math.prod(module.kernel_size) if isinstance(module, nn.Conv2d) else 1


def _conv_like_macs(module: nn.Module, shape: tuple[int, ...]) -> int:
    """MACs per sample of a stock conv / linear layer producing ``shape`` (batch first); 0 for others."""
    if isinstance(module, nn.Conv2d):
        return module.out_channels * module.in_channels // module.groups * _kernel(module) * math.prod(shape[2:])
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features * math.prod(shape[2:])
    return 0


def _layer_facts(module: nn.Module, step: Step, copies: str):
    """What the costs need of the layer the RDN makes from ``module`` for ``step`` (:mod:`rdn.surgery.plan`)."""
    if step.role is Role.NESTED:
        mask = block_mask(step.input_space, step.space, copies)
        layout = make_layout(step.input_space.splits, step.space.splits, mask)
        return NestedStepLayer(layout, _kernel(module), module.bias is not None)
    if step.role is Role.GROUPED:
        return GroupedLayer(module.weight.shape[1], _kernel(module), module.bias is not None)
    if step.role in (Role.CHANNEL_PARAMS, Role.GROUPWISE):  # 1-D per-channel tensors or 0-d ones (graph.py)
        parameters = list(module.parameters())
        return ChannelParamsLayer(sum(p.dim() > 0 for p in parameters), sum(p.dim() == 0 for p in parameters))
    if step.role is Role.FIXED:
        return FixedLayer(sum(p.numel() for p in module.parameters()), _conv_like_macs(module, step.shape))
    return None  # parameter-free channel-wise modules


def make_plan(graph: SurgeryGraph, record: NestRecord) -> Plan:
    """The plan of the RDN ``record`` describes for the analysed base model ``graph``.

    ``record.orders`` must hold a permutation for every layout of ``graph``; its pruned blocks are
    removed from the nested layers' masks.
    """
    orders, copies = record.orders, record.config.copies
    steps = []
    for name, info in graph.infos.items():
        space = graph.space(info.space_key, orders) if info.space_key is not None else None
        role = info.role
        if (role.per_group or role is Role.OPAQUE) and space.is_single_group:
            role = Role.FIXED
        if role is Role.OPAQUE:
            raise AssertionError(f"opaque node {name} outside the un-nested region")  # graph._pin forbids it
        input_space = graph.space(graph.space_of(info.inputs[0]), orders) if info.inputs else None
        holds_layer = info.module is not None and role is not Role.CLASSIFIER
        itemsize = info.dtype.itemsize if info.dtype is not None else 0
        step = Step(info.node, role, space, input_space, info.shape, itemsize, tuple(info.inputs),
                    info.node.target if holds_layer else None)  # fmt: skip
        if holds_layer:
            step = dataclasses.replace(step, layer=_layer_facts(info.module, step, copies))
        steps.append(step)
    classifier = graph.infos[graph.classifier].module
    features = graph.classifier_input
    heads = HeadPlan(
        features=features,
        feature_space=graph.space(graph.space_of(features), orders),
        feature_width=classifier.in_features,
        num_classes=classifier.out_features,
        bias=classifier.bias is not None,
        split=graph.depth_split,
    )
    groups = range(1, graph.num_groups + 1)
    if graph.depth_split is None:
        exits, regions = tuple((s, 1) for s in groups), ((0, len(steps)),)
    else:
        split = [step.name for step in steps].index(graph.depth_split) + 1
        exits = tuple((s, depth) for s in groups for depth in (0, 1))
        regions = ((0, split), (split, len(steps)))
    head_inputs = frozenset({features} | ({graph.depth_split} if graph.depth_split is not None else set()))
    steps = tuple(steps)
    lifetimes = plan_lifetimes(steps, regions, head_inputs)
    # every un-nested layer (skipped or pinned convs, and the grouped convs and norms beside them) and why
    unnested = tuple((step.name, graph.unnested_reason(step.name)) for step in steps
                     if step.role is Role.FIXED and step.module is not None)  # fmt: skip
    plan = Plan(record.replace(pruned_blocks={}), steps, graph.num_groups, heads, exits, regions, lifetimes,
                unnested, tuple(graph.after_classifier))  # fmt: skip
    return plan.with_pruned_blocks(record.pruned_blocks) if record.pruned_blocks else plan


class Modules(NamedTuple):
    """What a :class:`~rdn.surgery.network.RussianDollNet` holds besides its plan, and the mode it starts in."""

    layers: dict[str, nn.Module]  # graph node name → layer, for every step the plan holds a layer for
    heads: list[nn.Linear]  # heads[s - 1]: nn.Linear(F_s, C), the folded head of the full-depth exit of width s
    depth_heads: list[nn.Module]  # depth_heads[s - 1]: alignment block of the shallow exit of width s
    classifier: nn.Module  # the shallow exits' shared classifier; nn.Identity() without a depth split
    training: bool  # the mode the RDN starts in: the base classifier's


def _convert(step: Step, module: nn.Module, copies: str) -> nn.Module:
    """The RDN layer of ``step`` made from the base model's ``module``."""
    if step.role is Role.NESTED:
        weight, bias = nested_parameters(module.weight, module.bias, step.input_space, step.space, copies)
        layout = step.layer.layout
        if isinstance(module, nn.Linear):
            nested = NestedLinear.from_parameters(weight, bias, layout.in_splits, layout.out_splits, layout.mask)
        else:
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise ValueError(
                    f"conv {step.module} has padding {module.padding!r} / padding_mode {module.padding_mode!r}; "
                    "nested convs need integer zero padding"
                )
            nested = NestedConv2d.from_parameters(
                weight,
                bias,
                layout.in_splits,
                layout.out_splits,
                layout.mask,
                kernel_size=module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
            )
        return nested.train(module.training)
    if step.role is Role.GROUPED:
        if module.padding_mode != "zeros":
            raise ValueError(f"grouped conv {step.module} has padding_mode {module.padding_mode!r}; only 'zeros'")
        return inflate_grouped_conv(module, step.input_space, step.space, copies)
    if step.role is Role.CHANNEL_PARAMS:
        return inflate_channel_module(module, step.space, copies)
    if step.role is Role.GROUPWISE:  # every channel copy gets its channel's affine parameters
        take = lambda value: None if value is None else value.detach()[step.space.source.to(value.device)]  # noqa: E731
        group_norm = isinstance(module, nn.GroupNorm)
        # a GroupNorm's own groups are kept within every nesting group (so N_K's may be exact)
        groups = step.space.source // (module.num_channels // module.num_groups) if group_norm else None
        norm = GroupedNorm(step.space.splits, group_norm, module.eps, take(module.weight), take(module.bias), groups)
        return norm.train(module.training)
    return copy.deepcopy(module)


@torch.no_grad()
def _folded_head(classifier: nn.Linear, feature_space: ChannelSpace, s: int, copies: str) -> nn.Linear:
    """nn.Linear(F_s, C): the alignment of width s (:func:`~rdn.surgery.spaces.alignment_weight`) and the classifier."""
    weight = classifier.weight
    alignment = alignment_weight(feature_space, s, weight.dtype, copies).to(weight.device)
    head = nn.Linear(alignment.shape[1], classifier.out_features, bias=classifier.bias is not None,
                     device=weight.device, dtype=weight.dtype)  # fmt: skip
    head.weight.copy_(weight @ alignment)
    if classifier.bias is not None:
        head.bias.copy_(classifier.bias)
    return head


def _depth_head(channels: int, width: int, factory: dict) -> nn.Module:
    """The shallow exit's alignment block: N_s's ``channels`` of the split tensor → (N, ``width``) features."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 1, bias=False, **factory),
        nn.BatchNorm2d(width, **factory),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def build_modules(plan: Plan, graph: SurgeryGraph) -> Modules:
    """The RDN's layers and heads for ``plan``, made from the base model ``graph`` was traced from
    (which is left as it is: every layer is a new module)."""
    copies = plan.record.config.copies
    layers = {step.name: _convert(step, graph.modules[step.module], copies) for step in plan.layer_steps()}
    classifier = graph.infos[graph.classifier].module
    heads = [_folded_head(classifier, plan.heads.feature_space, s, copies) for s in range(1, plan.num_groups + 1)]
    if plan.heads.split is None:
        return Modules(layers, heads, [], nn.Identity(), classifier.training)
    split_space = plan.step(plan.heads.split).space
    factory = {"device": classifier.weight.device, "dtype": classifier.weight.dtype}
    widths = [
        len(split_space) if split_space.is_single_group else split_space.offsets[s]
        for s in range(1, plan.num_groups + 1)
    ]
    depth_heads = [_depth_head(channels, plan.heads.feature_width, factory) for channels in widths]
    return Modules(layers, heads, depth_heads, copy.deepcopy(classifier), classifier.training)


def trace_base(model: nn.Module, record: NestRecord, example: torch.Tensor) -> SurgeryGraph:
    """The analysis of ``model`` with the record's structural options (skip names, k, mode, ...)."""
    options = record.config
    return SurgeryGraph(model, example, list(options.skip or ()), options.k, options.mode, options.exact,
                        options.depth_split, options.copy_fraction, options.norms)  # fmt: skip


def rebuild(record: NestRecord, model: nn.Module | None = None) -> tuple[Plan, Modules]:
    """The plan and (freshly made) modules of the RDN ``record`` describes.

    Args:
        record: what :func:`rdn.nest` recorded.
        model: a base model of the same architecture (its weights are copied into the RDN's layers,
            which the caller then overwrites with ``load_state_dict``); default:
            ``rdn.models.create(**record.base)``.
    Raises:
        ValueError: when ``model`` is missing and the record has no ``base``, or when the model's
            layouts do not match the record's orders (another architecture).
    """
    if model is None:
        if not record.base:
            raise ValueError(
                "config has no 'base' model arguments: pass model= (a base model of the same architecture)"
            )
        model = create(**record.base)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = torch.zeros((1, *record.input_shape), dtype=dtype, device=device)
    with eval_mode(model), torch.no_grad():
        graph = trace_base(model, record, example)
    expected = set(graph.layouts)
    mismatched = set(record.orders) != expected or any(
        len(order) != graph.unit_counts[layout] for layout, order in record.orders.items()
    )
    if mismatched:
        raise ValueError(
            f"config orders {[(name, len(order)) for name, order in record.orders.items()]} (layout, units) do "
            f"not match this model's {[(name, graph.unit_counts[name]) for name in sorted(expected)]}; "
            "the model's architecture differs from the one the config was made from"
        )
    plan = make_plan(graph, record)
    return plan, build_modules(plan, graph)
