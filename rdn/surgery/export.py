"""Export of one exit of an RDN to a plain ``torch.fx.GraphModule`` of stock layers with sliced weights.

A function of the plan and the network's modules: nested layers become ``nn.Conv2d`` /
``nn.Linear`` on the prefix channels (blocks outside the mask zero), grouped convs and per-channel
modules are sliced, the full-depth head is its ``nn.Linear(F_s, C)`` and a shallow head its
alignment block and the classifier. No custom op: the result can be saved, ``torch.jit.trace``-d
and ONNX-exported (custom parameter-free layers of the base model, such as TF "same" padding, are
copied as they are).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from rdn.nn import NestedLinear
from rdn.surgery.graph import concat_inputs
from rdn.surgery.plan import Plan, Role, Step
from rdn.surgery.spaces import channel_view

__all__ = ["export_exit"]


def _sliced_grouped_conv(layer: nn.Conv2d, step: Step, s: int) -> nn.Conv2d:
    """The first ``offsets[s]`` output channels of grouped conv ``layer`` as a conv of their own."""
    in_channels, out_channels = step.input_space.offsets[s], step.space.offsets[s]
    sliced = nn.Conv2d(
        in_channels,
        out_channels,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        groups=out_channels // (layer.out_channels // layer.groups),
        bias=layer.bias is not None,
        device=layer.weight.device,
        dtype=layer.weight.dtype,
    )
    with torch.no_grad():
        sliced.weight.copy_(layer.weight[:out_channels])
        if layer.bias is not None:
            sliced.bias.copy_(layer.bias[:out_channels])
    return sliced


def _export_layer(layer: nn.Module, step: Step, s: int) -> nn.Module:
    if step.role is Role.NESTED:
        return layer.export_linear(s) if isinstance(layer, NestedLinear) else layer.export_conv(s)
    if step.role is Role.GROUPED:
        return _sliced_grouped_conv(layer, step, s)
    if step.role is Role.CHANNEL_PARAMS:
        return copy.deepcopy(channel_view(layer, slice(0, step.space.offsets[s]), copy_values=True))
    if step.role is Role.GROUPWISE:  # GroupedNorm: plain torch ops on its first s groups
        return layer.prefix(s)
    return copy.deepcopy(layer)


def _export_concat(graph: fx.Graph, plan: Plan, step: Step, s: int, mapping: dict[fx.Node, fx.Node]) -> fx.Node:
    """Groups 0..s-1 of a concatenation as stock nodes: every part's channels of group q, group after group."""
    pieces = []
    for q in range(s):
        for part in concat_inputs(step.node):
            space = plan.step(part.name).space
            if space.splits[q]:
                channels = slice(space.offsets[q], space.offsets[q + 1])
                pieces.append(graph.call_function(operator.getitem, (mapping[part], (slice(None), channels))))
    return graph.call_function(torch.cat, (pieces, 1))


def export_exit(
    plan: Plan,
    layers: Mapping[str, nn.Module],
    heads: Sequence[nn.Module],
    depth_heads: Sequence[nn.Module],
    classifier: nn.Module,
    subnet: int,
    training: bool = False,
) -> fx.GraphModule:
    """Exit ``subnet`` (1-based) of the RDN with these modules as stock layers (module docstring).

    Args:
        plan: the RDN's plan; ``layers``, ``heads``, ``depth_heads``, ``classifier``: its modules.
        training: the mode of the result.
    """
    s, depth = plan.exit(subnet)
    names = {step.name for step in plan.steps}
    head_name = "subnet_head"
    while head_name in names:  # a node of the base model may have that name
        head_name += "_"
    root: dict[str, nn.Module] = {}
    graph = fx.Graph()
    mapping: dict[fx.Node, fx.Node] = {}
    for step in plan.exit_steps(depth):
        node = step.node
        if step.role is Role.CLASSIFIER:
            root[head_name] = copy.deepcopy(heads[s - 1])
            mapping[node] = graph.call_module(head_name, (mapping[node.args[0]],))
        elif step.role is Role.CONCAT:
            mapping[node] = _export_concat(graph, plan, step, s, mapping)
        elif node.op == "call_module":
            root[step.name] = _export_layer(layers[step.name], step, s)
            mapping[node] = graph.call_module(step.name, *fx.node.map_arg((node.args, node.kwargs), mapping.get))
        else:
            mapping[node] = graph.node_copy(node, lambda n: mapping[n])
    if depth == 0:
        root[head_name] = nn.Sequential(*copy.deepcopy(depth_heads[s - 1]), copy.deepcopy(classifier))
        graph.output(graph.call_module(head_name, (mapping[plan.step(plan.heads.split).node],)))
    exported = fx.GraphModule(root, graph)
    if depth == 0:  # drop what only fed the later blocks
        exported.graph.eliminate_dead_code()
        exported.delete_all_unused_submodules()
        exported.recompile()
    return exported.train(training)
