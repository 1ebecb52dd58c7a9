"""Costs of an RDN's exits, as functions of its plan: MACs, parameters, feature-map size, peak
activation memory.

All are per sample at the calibration input size (``NestRecord.input_shape``) and count only what
the exit computes: the blocks of its groups in nested layers, its channel slices of grouped convs and
per-channel modules, the un-nested layers whole, and its head.

MACs count conv and linear layers only (BN, activations, adds and pooling are not MACs, as in the
MobileNet papers), the convention of :mod:`rdn.models.profile`. Feature-map elements count every
value the exit computes (each node's output, BN and activations included): the work of the
memory-bound layers and what a training step keeps for its backward, which MACs do not see.
"""

from __future__ import annotations

import math

from rdn.surgery.plan import ChannelParamsLayer, FixedLayer, GroupedLayer, NestedStepLayer, Plan, Role, Step

__all__ = [
    "activation_elements",
    "activation_ratio",
    "base_activation_elements",
    "head_costs",
    "macs",
    "params",
    "peak_activation_bytes",
    "void_groups",
]


def head_costs(plan: Plan, s: int, depth: int) -> tuple[int, int]:
    """(MACs, params) of the head of exit (width ``s``, ``depth``).

    A full-depth head is one folded ``nn.Linear(F_s, C)``; a shallow head is its alignment block
    (1×1 conv to F, BN) and the shared classifier ``F → C``.
    """
    heads = plan.heads
    classes, bias = heads.num_classes, heads.num_classes if heads.bias else 0
    if depth == 1:
        weights = heads.features_of(s) * classes
        return weights, weights + bias
    split = plan.step(heads.split)
    channels = len(split.space) if split.space.is_single_group else split.space.offsets[s]
    conv, norm, classifier = channels * heads.feature_width, 2 * heads.feature_width, heads.feature_width * classes
    return conv * math.prod(split.shape[2:]) + classifier, conv + norm + classifier + bias


def _step_macs(step: Step, s: int) -> int:
    layer = step.layer
    spatial = math.prod(step.shape[2:]) if step.shape is not None else 1
    if isinstance(layer, NestedStepLayer):
        return layer.layout.useful_macs_per_pixel(0, s) * layer.kernel * spatial
    if isinstance(layer, GroupedLayer):
        return step.space.offsets[s] * layer.group_inputs * layer.kernel * spatial
    if isinstance(layer, FixedLayer):
        return layer.macs
    return 0


def _step_params(step: Step, s: int) -> int:
    layer = step.layer
    if isinstance(layer, NestedStepLayer):
        bias = layer.layout.out_offsets[s] if layer.bias else 0
        return layer.layout.useful_macs_per_pixel(0, s) * layer.kernel + bias
    if isinstance(layer, GroupedLayer):
        return step.space.offsets[s] * (layer.group_inputs * layer.kernel + layer.bias)
    if isinstance(layer, ChannelParamsLayer):
        return step.space.offsets[s] * layer.channel_tensors + layer.scalar_params
    if isinstance(layer, FixedLayer):
        return layer.params
    return 0


def macs(plan: Plan, subnet: int) -> int:
    """Multiply-accumulates of exit ``subnet`` (1-based) for one sample: nested layers count only
    the blocks N_s computes, grouped convs the channels N_s computes, un-nested layers in full;
    plus the exit's head."""
    s, depth = plan.exit(subnet)
    return sum(_step_macs(step, s) for step in plan.exit_steps(depth)) + head_costs(plan, s, depth)[0]


def params(plan: Plan, subnet: int) -> int:
    """Parameters exit ``subnet`` reads: its blocks, channel slices, un-nested layers and its head."""
    s, depth = plan.exit(subnet)
    return sum(_step_params(step, s) for step in plan.exit_steps(depth)) + head_costs(plan, s, depth)[1]


def _feature_steps(plan: Plan, depth: int) -> list[Step]:
    """The steps of an exit of ``depth`` whose output is a feature map (not the classifier or the output)."""
    return [step for step in plan.exit_steps(depth)
            if step.shape is not None and step.role not in (Role.CLASSIFIER, Role.OUTPUT)]  # fmt: skip


def _channels(step: Step, s: int) -> int:
    """Channels of ``step``'s output that an exit of width ``s`` computes."""
    multi_group = step.space is not None and not step.space.is_single_group
    return step.space.offsets[s] if multi_group else step.shape[1]


def activation_elements(plan: Plan, subnet: int) -> int:
    """Feature-map elements exit ``subnet`` computes for one sample: Σ over the nodes it runs of
    the channels it computes × the node's spatial size (the input and its head's own activations
    excluded)."""
    s, depth = plan.exit(subnet)
    return sum(_channels(step, s) * math.prod(step.shape[2:])
               for step in _feature_steps(plan, depth) if step.role is not Role.INPUT)  # fmt: skip


def base_activation_elements(plan: Plan) -> int:
    """:func:`activation_elements` of the base model the plan was made from (its full-depth graph)."""
    return sum(math.prod(step.shape[1:]) for step in _feature_steps(plan, 1) if step.role is not Role.INPUT)


def activation_ratio(plan: Plan, subnet: int) -> float:
    """:func:`activation_elements` of exit ``subnet`` over the base model's (what ``activation_budget`` bounds)."""
    return activation_elements(plan, subnet) / base_activation_elements(plan)


def void_groups(plan: Plan) -> list[int]:
    """The widths s (1-based) whose channel group is empty in every layer: N_s computes what N_{s-1} does."""
    spaces = [step.space for step in plan.steps if step.space is not None and not step.space.is_single_group]
    widths = plan.record.config.num_subnets
    return [s for s in range(2, widths + 1) if spaces and all(space.offsets[s] == space.offsets[s - 1]
                                                               for space in spaces)]  # fmt: skip


def peak_activation_bytes(plan: Plan, subnet: int, batch_size: int = 1) -> int:
    """Estimated peak activation memory of running exit ``subnet`` alone (bytes).

    Walks the plan in execution order: every node's output (its N_s channels × pixels × dtype size,
    at the calibration input size) is allocated when computed and freed after its last reader; the
    peak of the live total is returned, times ``batch_size``. In-place ops, the head's own
    activations and allocator caching are ignored; the staged path keeps its cache (full-width
    nested-layer inputs and head inputs) alive instead.
    """
    s, depth = plan.exit(subnet)
    steps = plan.exit_steps(depth)
    feature_steps = {step.name for step in _feature_steps(plan, depth)}
    last_reader: dict[str, int] = {}
    for index, step in enumerate(steps):
        for node in step.node.all_input_nodes:
            last_reader[node.name] = index
    last_reader[plan.heads.features if depth == 1 else plan.heads.split] = len(steps)
    live, peak, sizes = 0, 0, {}
    for index, step in enumerate(steps):
        if step.name in feature_steps:
            sizes[step.name] = _channels(step, s) * math.prod(step.shape[2:]) * step.itemsize
            live += sizes[step.name]
            peak = max(peak, live)
        for node in step.node.all_input_nodes:
            if last_reader[node.name] == index and node.name in sizes:
                live -= sizes.pop(node.name)
    return peak * batch_size
