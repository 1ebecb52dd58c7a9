"""Multiply-accumulate (MAC) and parameter counts of a model, measured by forward hooks.

Only convolutions and linear layers are counted (BN, activations, pooling and adds are not), the
convention of the papers whose numbers we compare against:

- ``nn.Conv2d``: output elements × in_channels / groups × kh × kw;
- ``nn.Linear``: output elements × in_features;
- :class:`rdn.nn.NestedConv2d` / :class:`rdn.nn.NestedLinear`: only the blocks in the mask that
  the call computed (its ``stages``): batch × output pixels × kh × kw × Σ_{(j, i) ∈ mask, lo ≤ j < hi} d_j c_i.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rdn.nn import NestedConv2d, NestedLinear


@dataclass
class ModelProfile:
    """Counts for one forward pass of a given input (MACs scale with its batch size)."""

    macs: int
    params: int
    layer_macs: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.params / 1e6:.3f} M params, {self.macs / 1e6:.1f} M MACs"


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (every stored element, masked nested blocks included)."""
    return sum(parameter.numel() for parameter in model.parameters())


def _layer_macs(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> int:
    if isinstance(module, (NestedConv2d, NestedLinear)):
        stages = kwargs.get("stages", args[1] if len(args) > 1 else None)
        lo, hi = stages if stages is not None else (0, module.num_groups)
        # Batch × output pixels; the channel count of output differs with stages and out=.
        pixels = output.shape[0] * math.prod(output.shape[2:])
        kernel = math.prod(module.kernel_size) if isinstance(module, NestedConv2d) else 1
        return pixels * kernel * module.layout.useful_macs_per_pixel(lo, hi)
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    raise TypeError(f"no MAC rule for {type(module).__name__}")


_COUNTED = (nn.Conv2d, nn.Linear, NestedConv2d, NestedLinear)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; afterwards every sub-module gets its *own* mode back.

    ``model.train(was_training)`` would not do: it sets every sub-module to the top module's mode,
    so a BN frozen in eval mode inside a training model would come back in train mode.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def run_with_forward_hooks(
    model: nn.Module, input: Tensor, hooks: Iterable[tuple[nn.Module, Callable]], with_kwargs: bool = False
) -> Any:
    """``model(input)`` once in eval mode with forward ``hooks`` ((module, hook) pairs) registered.

    The hooks are removed and every module is put back in its own mode afterwards, even on error.
    """
    handles = [module.register_forward_hook(hook, with_kwargs=with_kwargs) for module, hook in hooks]
    try:
        with eval_mode(model):
            return model(input)
    finally:
        for handle in handles:
            handle.remove()


def profile_model(model: nn.Module, input: Tensor | tuple[int, ...] = (1, 3, 224, 224)) -> ModelProfile:
    """Run ``model`` once on ``input`` (a tensor, or a shape filled with zeros) and count MACs.

    The model is run in eval mode; every module gets its own mode back.
    """
    if not isinstance(input, Tensor):
        parameter = next(model.parameters(), None)
        input = torch.zeros(
            input,
            device=parameter.device if parameter is not None else None,
            dtype=parameter.dtype if parameter is not None else None,
        )
    layer_macs: dict[str, int] = {}

    def record(name: str):
        def hook(module, args, kwargs, output):
            layer_macs[name] = layer_macs.get(name, 0) + _layer_macs(module, args, kwargs, output)

        return hook

    hooks = [(module, record(name)) for name, module in model.named_modules() if isinstance(module, _COUNTED)]
    run_with_forward_hooks(model, input, hooks, with_kwargs=True)
    return ModelProfile(macs=sum(layer_macs.values()), params=count_params(model), layer_macs=layer_macs)
