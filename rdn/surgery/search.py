"""The MAC budget's search: which cheaper construction of N_K reproduces the base model best.

Expand mode keeps every connection of the base model only at about twice its MACs (``exact=True``).
Three knobs make N_K cheaper, each losing part of the base function:

- ``copy_fraction``: fewer channels get a copy in the added groups (their other connections drop);
- the budget pass (:mod:`rdn.surgery.passes.budget`): blocks of the added groups drop until N_K fits;
- ``compensate`` (:mod:`rdn.surgery.passes.compensate`): the copies that lost inputs are refitted by
  least squares.

Which mix is best depends on the model, so :func:`search_construction` tries them: every copy
fraction of :data:`~rdn.surgery.config.COPY_FRACTIONS` (or the one the config fixes), pruned down to
the budget where it exceeds it, with and without compensation (or as the config fixes), and keeps
the candidate whose N_K has the least *logit error* against the base model: the share of the base
logits' variance N_K does not reproduce, ``Σ‖z_K − z‖² / Σ‖z − z̄‖²`` (0: the base model; 1: no
better than predicting the mean logits). The candidates are built on the first three quarters of
the calibration images and scored on the last quarter (on all of them when that quarter would hold
fewer than 8 images),
so compensation, which is fitted to its data, is not favoured by scoring on it. Equal errors go to
the cheaper candidate. Every candidate's costs and scores are recorded
(``NestRecord.search``), the chosen one's options in the record's config.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rdn.models.profile import eval_mode
from rdn.surgery.config import COPY_FRACTIONS, NestConfig
from rdn.surgery.passes.budget import BudgetOutOfReach

__all__ = ["Candidate", "candidate_options", "logit_error", "scoring_split", "search_construction"]

# Fewer scoring samples than this: score on the calibration images the candidates were built on.
_MIN_HELD_OUT_SPLIT = 8


@dataclass(frozen=True)
class Candidate:
    """One construction the search tried and how it did on the held-out calibration images."""

    copy_fraction: float
    compensate: bool
    mac_ratio: float | None  # N_K's MACs / the base model's; None: out of the budget's reach
    logit_error: float | None  # see logit_error; None when out of reach
    agreement: float | None  # share of held-out images where N_K predicts the base model's class
    note: str = ""  # why a candidate is out of reach

    def to_dict(self) -> dict:
        return {"copy_fraction": self.copy_fraction, "compensate": self.compensate, "mac_ratio": self.mac_ratio,
                "logit_error": self.logit_error, "agreement": self.agreement, "note": self.note}  # fmt: skip


def logit_error(logits: Tensor, base_logits: Tensor) -> float:
    """Share of the base logits' variance (N, C) that ``logits`` (N, C) do not reproduce:
    Σ‖z − z_base‖² / Σ‖z_base − mean‖² over samples (the mean over samples); with constant base logits
    (N = 1 or a degenerate model) the denominator is Σ‖z_base‖² instead."""
    logits, base_logits = logits.double(), base_logits.double()
    residual = (logits - base_logits).pow(2).sum()
    spread = (base_logits - base_logits.mean(0)).pow(2).sum()
    if spread <= 1e-12 * base_logits.pow(2).sum().clamp_min(1e-300):
        spread = base_logits.pow(2).sum()
    return float(residual / spread) if spread > 0 else float(residual)


def scoring_split(batch: Tensor) -> tuple[Tensor, Tensor]:
    """(images the candidates are built on, images they are scored on): the first three quarters and the
    last quarter of ``batch`` (N, ...), or the whole batch twice when the quarter would be under 8 images."""
    held_out = batch.shape[0] // 4
    if held_out < _MIN_HELD_OUT_SPLIT:
        return batch, batch
    return batch[:-held_out], batch[-held_out:]


def candidate_options(config: NestConfig) -> list[tuple[float, bool]]:
    """(copy_fraction, compensate) of every candidate ``config`` leaves open, most copies first."""
    fractions = COPY_FRACTIONS if config.copy_fraction is None else (config.copy_fraction,)
    compensations = (False, True) if config.compensate is None else (config.compensate,)
    if config.copies != "latest":  # compensation refits whole values only
        compensations = tuple(choice for choice in compensations if not choice) or (False,)
    return [(fraction, compensate) for fraction in fractions for compensate in compensations]


def search_construction(
    config: NestConfig,
    build: Callable[[NestConfig], nn.Module],
    compensate: Callable[[nn.Module], nn.Module],
    scoring_images: Tensor,
    base_logits: Callable[[], Tensor],
    mac_ratio: Callable[[nn.Module], float],
) -> tuple[nn.Module, NestConfig, list[Candidate]]:
    """Build every candidate construction within ``config.mac_budget`` and keep the best (module docstring).

    Args:
        config: the surgery's options, ``mac_budget`` set; unset ``copy_fraction`` / ``compensate`` are searched.
        build: a config with both set → the network, pruned to the budget (raises
            :class:`~rdn.surgery.passes.budget.BudgetOutOfReach` when it cannot fit), not yet compensated.
        compensate: a built network → a compensated copy of it.
        scoring_images: (N, ...) the held-out calibration images.
        base_logits: () → (N, classes) the base model's logits on them (called after the first build, whose
            graph analysis has checked the images' shape against the model).
        mac_ratio: a network → its N_K's MACs over the base model's.
    Returns:
        The chosen network (eval mode as built), its config (``copy_fraction`` and ``compensate`` set),
        and every candidate tried, in the order tried.
    Raises:
        ValueError: when no candidate fits the budget (naming the cheapest reach).
    """
    candidates: list[Candidate] = []
    best: tuple[float, float, nn.Module, NestConfig] | None = None
    reaches: list[str] = []
    built: dict[float, nn.Module] = {}
    for fraction, refit in candidate_options(config):
        if fraction not in built:
            try:
                built[fraction] = build(config.replace(copy_fraction=fraction, compensate=False))
            except BudgetOutOfReach as error:  # even with every droppable block dropped
                built[fraction] = None
                reaches.append(f"copy_fraction={fraction}: {error}")
        if built[fraction] is None:
            candidates.append(Candidate(fraction, refit, None, None, None, "out of the budget's reach"))
            continue
        net = compensate(built[fraction]) if refit else built[fraction]
        with eval_mode(net), torch.no_grad():
            logits = net(scoring_images, subnet=net.num_subnets).float()
        reference = base_logits()
        error = logit_error(logits, reference)
        agreement = float((logits.argmax(1) == reference.argmax(1)).double().mean())
        ratio = mac_ratio(net)
        candidates.append(Candidate(fraction, refit, ratio, error, agreement))
        if not math.isfinite(error):
            continue
        if best is None or (error, ratio) < (best[0], best[1]):
            best = (error, ratio, net, config.replace(copy_fraction=fraction, compensate=refit))
    if best is None:
        raise ValueError(
            f"mac_budget={config.mac_budget} is out of reach for every construction tried (N_K's MACs over the "
            f"base model's): {'; '.join(reaches)}. Raise mac_budget, or use mode='truncate' (no added groups)"
        )
    return best[2], best[3], candidates
