"""Optimiser, learning-rate schedule and weight EMA of the training loop."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["ModelEma", "WarmupCosine", "build_optimizer", "build_scheduler"]


def build_optimizer(
    model: nn.Module, lr: float, momentum: float, nesterov: bool, weight_decay: float
) -> torch.optim.SGD:
    """SGD (Nesterov) with weight decay on conv / linear weights only: BN scales and biases are not decayed."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() > 1 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)


class WarmupCosine:
    """lr factor at step t: linear warm-up over ``warmup_steps``, then cosine from 1 to ``min_ratio``.

    A callable object (not a closure) so that ``LambdaLR.state_dict`` records its settings.
    """

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float) -> None:
        self.total_steps, self.warmup_steps, self.min_ratio = total_steps, warmup_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, lr: float, min_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step warm-up + cosine schedule from ``lr`` down to ``min_lr``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, min(1.0, min_lr / lr)))


class ModelEma:
    """Exponential moving average of a model's weights (a frozen copy in eval mode).

    After update t the EMA decay is ``min(decay, (1 + t) / (10 + t))``: early on the average
    follows the model closely, so a short run still gets a useful EMA. Floating-point parameters
    are averaged; buffers (BN running statistics, counters) are copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        params = [(e, p) for e, p in zip(self.module.parameters(), model.parameters(), strict=True)
                  if p.is_floating_point()]  # fmt: skip
        if params:
            ema_params, model_params = zip(*params, strict=True)
            torch._foreach_lerp_(list(ema_params), [p.detach() for p in model_params], 1.0 - decay)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates, self.decay = state["updates"], state["decay"]
