"""Inference copies of an RDN: BatchNorm folded into the conv it reads.

In eval mode a BatchNorm is a per-channel affine map, ``y = x · s + t`` with ``s = γ / √(σ² + ε)``
and ``t = β − μ · s``; when its only input is a conv's output, scaling that conv's output rows by
``s`` and adding ``t`` to its bias computes the same values with one pass over memory fewer. On
the CPU a BN over a feature map costs about what a depthwise conv does, so folding removes a large
share of a mobile net's inference time, in every path alike (one pass, ``subnet=s``, the staged
``start`` / ``step`` of the early-exit engine, export): a nested conv's row scaling keeps its zero
blocks zero, and a channel slice of the folded conv is the fold of the slice.

The copy is for inference only: its BNs are gone, so training it would train a different model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from rdn.nn import NestedConv2d
from rdn.surgery.network import RussianDollNet

__all__ = ["fold_batch_norms"]


@torch.no_grad()
def fold_batch_norms(net: RussianDollNet) -> RussianDollNet:
    """An eval-mode copy of ``net`` whose BatchNorm2d layers that alone read a conv (``nn.Conv2d``,
    grouped / depthwise included, or :class:`~rdn.nn.NestedConv2d`) are folded into it; ``net`` is
    left as it is. BNs without running statistics, or whose conv output has other readers, stay.
    Returns the copy; ``copy.folded_norms`` names the folded layers (step names)."""
    if not isinstance(net, RussianDollNet):
        raise TypeError(f"net must be a RussianDollNet, got {type(net).__name__}")
    folded = copy.deepcopy(net).eval()
    names = []
    for step in folded.plan.steps:
        norm = folded.layers[step.name] if step.module is not None else None
        if type(norm) is not nn.BatchNorm2d or norm.running_mean is None or norm.running_var is None:
            continue  # subclasses (BN + activation and the like) do more than the affine map
        inputs = step.node.all_input_nodes
        source = folded.plan.step(inputs[0].name) if len(inputs) == 1 else None
        conv = folded.layers[source.name] if source is not None and source.module is not None else None
        if not isinstance(conv, (nn.Conv2d, NestedConv2d)) or len(source.node.users) != 1:
            continue
        scale = norm.running_var.add(norm.eps).rsqrt()
        if norm.weight is not None:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale
        if norm.bias is not None:
            shift = shift + norm.bias
        conv.weight.mul_(scale.to(conv.weight.dtype).view(-1, *[1] * (conv.weight.dim() - 1)))
        bias = shift if conv.bias is None else conv.bias * scale + shift
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
        folded.layers[step.name] = nn.Identity()
        names.append(step.name)
    folded.folded_norms = tuple(names)
    return folded
