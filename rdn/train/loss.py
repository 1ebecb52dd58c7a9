"""The joint loss of all exits from one forward pass: Σ_s w_s·CE(logits_s, y) (DESIGN.md §5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rdn.train.config import EXITS

__all__ = ["JointLoss", "exit_weights"]


def exit_weights(num_exits: int, exits: str = "all", weights: Sequence[float] | None = None) -> list[float]:
    """w_1..w_K of the joint loss.

    ``exits`` picks the trained exits (paper Table 5 ablations): ``all``, ``all_but_lightest``
    (w_1 = 0) or ``largest`` (only N_K). Without explicit ``weights`` the trained exits share
    equal weights summing to 1; with them, exits outside ``exits`` still get weight 0.
    """
    if exits not in EXITS:
        raise ValueError(f"exits must be one of {EXITS}, got {exits!r}")
    if exits == "all_but_lightest" and num_exits < 2:
        raise ValueError("exits='all_but_lightest' needs at least 2 exits; this model has 1 (train a nested RDN)")
    trained = {
        "all": [True] * num_exits,
        "all_but_lightest": [False] + [True] * (num_exits - 1),
        "largest": [False] * (num_exits - 1) + [True],
    }[exits]
    if weights is None:
        return [1.0 / sum(trained) if on else 0.0 for on in trained]
    if len(weights) != num_exits:
        raise ValueError(f"exit_weights has {len(weights)} entries, the model has {num_exits} exits")
    chosen = [float(w) if on else 0.0 for w, on in zip(weights, trained, strict=True)]
    if not any(chosen):
        raise ValueError(f"exit_weights {list(weights)} with exits={exits!r} train no exit")
    return chosen


class JointLoss:
    """Σ_s w_s·ℓ_s over the K exits' logits, with optional in-place distillation.

    ℓ_s = CE(logits_s, y) with label smoothing; with ``distill`` = α > 0, the exits s < K learn
    ℓ_s = (1 - α)·CE + α·T²·KL(softmax(z_K / T) ‖ softmax(z_s / T)), N_K's logits z_K detached
    (soft labels from the same forward pass; N_K itself learns from y only).
    """

    def __init__(
        self, weights: Sequence[float], label_smoothing: float = 0.0, distill: float = 0.0, temperature: float = 1.0
    ) -> None:
        self.weights = list(weights)
        self.label_smoothing, self.distill, self.temperature = label_smoothing, distill, temperature

    def _cross_entropy(self, stacked: Tensor, target: Tensor) -> Tensor:
        """(E, N, C) logits of E exits → (E,) mean CE of each, in one fused call."""
        exits, batch, classes = stacked.shape
        return F.cross_entropy(
            stacked.reshape(-1, classes),
            target.repeat(exits),
            label_smoothing=self.label_smoothing,
            reduction="none",
        ).view(exits, batch).mean(1)

    def __call__(self, logits: Sequence[Tensor], target: Tensor) -> tuple[Tensor, Tensor]:
        """logits: K tensors (N, num_classes); target (N,). Returns (loss, per-exit CE (K,) detached).

        Exits with weight 0 stay out of the graph, so their heads get no gradient at all (and no
        weight decay): the ablations train exactly the chosen exits.
        """
        if len(logits) != len(self.weights):
            raise ValueError(f"got {len(logits)} exits' logits for {len(self.weights)} exit weights")
        with torch.no_grad():
            per_exit = self._cross_entropy(torch.stack([z.float() for z in logits]), target)
        trained = [s for s, w in enumerate(self.weights) if w > 0]
        ce = self._cross_entropy(torch.stack([logits[s].float() for s in trained]), target)
        last = len(logits) - 1
        students = [i for i, s in enumerate(trained) if s != last]
        if self.distill > 0 and students:
            t = self.temperature
            teacher = F.softmax(logits[last].detach().float() / t, dim=-1)
            student = F.log_softmax(torch.stack([logits[trained[i]].float() for i in students]) / t, dim=-1)
            kl = F.kl_div(student, teacher.expand_as(student), reduction="none").sum(-1).mean(-1) * t * t
            mixed = (1 - self.distill) * ce[students] + self.distill * kl
            ce = ce.index_put((torch.tensor(students, device=ce.device),), mixed)
        weights = torch.tensor([self.weights[s] for s in trained], dtype=ce.dtype, device=ce.device)
        return (weights * ce).sum(), per_exit
