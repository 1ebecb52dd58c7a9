"""The MAC budget's search: which cheaper construction of N_K reproduces the base model best.

Expand mode keeps every connection of the base model only at about twice its MACs (``exact=True``).
Three knobs make N_K cheaper, each losing part of the base function:

- ``copy_fraction``: fewer channels get a copy in the added groups (their other connections drop),
  so N_K computes fewer feature maps (``activation_budget`` bounds them: a fraction whose N_K
  exceeds it is out of reach);
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
fewer than 8 images), so compensation, which is fitted to its data, is not favoured by scoring on
it. Equal errors go to the cheaper candidate; before the error comes the number of exits that repeat
the exit before (an added group left without any channel, as few copies on a small model can do),
so a candidate with fewer such void exits always wins. When no fraction fits ``activation_budget``,
the fewest feature maps that fit the rest are kept, with a :class:`BudgetWarning`. Every
candidate's costs and scores are recorded (``NestRecord.search``), the chosen one's options in the
record's config.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from rdn.models.profile import eval_mode
from rdn.surgery.config import COPY_FRACTIONS, NestConfig
from rdn.surgery.passes.budget import BudgetOutOfReach

__all__ = [
    "BudgetWarning",
    "Candidate",
    "CandidateCosts",
    "FeatureMapsOutOfReach",
    "candidate_options",
    "logit_error",
    "scoring_split",
    "search_construction",
]

# Fewer scoring samples than this: score on the calibration images the candidates were built on.
_MIN_HELD_OUT_SPLIT = 8


class FeatureMapsOutOfReach(BudgetOutOfReach):
    """N_K computes more feature-map elements than ``activation_budget`` allows (``ratio``: its ratio to the base's)."""

    def __init__(self, message: str, ratio: float) -> None:
        super().__init__(message)
        self.ratio = ratio


class BudgetWarning(UserWarning):
    """The search could not meet ``activation_budget`` and kept the construction with the fewest feature maps."""


@dataclass(frozen=True)
class Candidate:
    """One construction the search tried and how it did on the held-out calibration images."""

    copy_fraction: float
    compensate: bool
    mac_ratio: float | None  # N_K's MACs / the base model's; None: out of the budget's reach
    logit_error: float | None  # see logit_error; None when out of reach
    agreement: float | None  # share of held-out images where N_K predicts the base model's class
    note: str = ""  # why a candidate is out of reach (the budget pass's message)
    activation_ratio: float | None = None  # N_K's feature-map elements / the base model's (costs.activation_elements)
    repeated_exits: int | None = None  # exits whose group is empty everywhere: they repeat the exit before

    def to_dict(self) -> dict:
        return {"copy_fraction": self.copy_fraction, "compensate": self.compensate, "mac_ratio": self.mac_ratio,
                "activation_ratio": self.activation_ratio, "repeated_exits": self.repeated_exits,
                "logit_error": self.logit_error, "agreement": self.agreement, "note": self.note}  # fmt: skip


class CandidateCosts(NamedTuple):
    """What the search weighs of a candidate besides its error."""

    mac_ratio: float  # N_K's MACs / the base model's
    activation_ratio: float | None = None  # N_K's feature-map elements / the base model's
    repeated_exits: int = 0  # exits that compute what the exit before does (costs.void_groups)


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
    build: Callable[[NestConfig, float | None], nn.Module],
    compensate: Callable[[nn.Module], nn.Module],
    scoring_images: Tensor,
    base_logits: Callable[[], Tensor],
    measure: Callable[[nn.Module], CandidateCosts],
) -> tuple[nn.Module, NestConfig, list[Candidate]]:
    """Build every candidate construction within ``config.mac_budget`` and keep the best (module docstring).

    Args:
        config: the surgery's options, ``mac_budget`` set; unset ``copy_fraction`` / ``compensate`` are searched.
        build: (a config with both set, the bound on N_K's feature maps or None) → the network, pruned to the
            MAC budget, not yet compensated; raises :class:`FeatureMapsOutOfReach` when N_K exceeds the
            feature-map bound (checked before anything is built), :class:`~rdn.surgery.passes.budget.
            BudgetOutOfReach` when it cannot fit the MAC budget.
        compensate: a built network → a compensated copy of it.
        scoring_images: (N, ...) the held-out calibration images.
        base_logits: () → (N, classes) the base model's logits on them (called after the first build, whose
            graph analysis has checked the images' shape against the model).
        measure: a network → its :class:`CandidateCosts`.
    Returns:
        The chosen network (eval mode as built), its config (``copy_fraction`` and ``compensate`` set, so no
        ``activation_budget``: with the fraction fixed it has nothing left to bound),
        and every candidate tried, in the order tried.
    Raises:
        ValueError: when no candidate fits the MAC budget (naming the cheapest reach).
    Warns:
        BudgetWarning: when no copy fraction fits ``activation_budget``: the search then keeps, of those over
            it, the fraction with the fewest feature maps that fits the rest.
    """
    candidates: list[Candidate] = []
    best: tuple[tuple, nn.Module, NestConfig] | None = None
    reaches: list[str] = []
    over_bound: dict[float, float] = {}  # fraction → N_K's feature-map ratio, for those over the bound only

    def build_fraction(fraction: float, bound: float | None) -> nn.Module | str:
        """The built network, or why it is out of reach (recorded, and kept for the error)."""
        try:
            return build(config.replace(copy_fraction=fraction, compensate=False, activation_budget=None), bound)
        except FeatureMapsOutOfReach as error:
            over_bound[fraction] = error.ratio
            reaches.append(f"copy_fraction={fraction}: {error}")
            return str(error)
        except BudgetOutOfReach as error:  # over the MACs with every droppable block dropped
            reaches.append(f"copy_fraction={fraction}: {error}")
            return str(error)

    def score(fraction: float, refit: bool, built: nn.Module | str) -> None:
        nonlocal best
        if isinstance(built, str):
            candidates.append(Candidate(fraction, refit, None, None, None, built))
            return
        net = compensate(built) if refit else built
        with eval_mode(net), torch.no_grad():
            logits = net(scoring_images, subnet=net.num_subnets).float()
        reference = base_logits()
        error = logit_error(logits, reference)
        agreement = float((logits.argmax(1) == reference.argmax(1)).double().mean())
        costs = measure(net)
        candidates.append(Candidate(fraction, refit, costs.mac_ratio, error, agreement,
                                    activation_ratio=costs.activation_ratio, repeated_exits=costs.repeated_exits))
        key = (costs.repeated_exits, error, costs.mac_ratio)
        if math.isfinite(error) and (best is None or key < best[0]):
            best = (key, net, config.replace(copy_fraction=fraction, compensate=refit, activation_budget=None))

    options = candidate_options(config)
    built: dict[float, nn.Module | str] = {}
    for fraction, refit in options:
        if fraction not in built:
            built[fraction] = build_fraction(fraction, config.activation_budget)
        score(fraction, refit, built[fraction])
    if best is None and over_bound:
        # No fraction fits the feature-map bound: keep the fewest feature maps that fit the rest, and say so.
        for fraction in sorted(over_bound, key=over_bound.get):
            fallback = build_fraction(fraction, None)
            for option, refit in options:
                if option == fraction:
                    score(fraction, refit, fallback)
            if best is not None:
                warnings.warn(
                    f"activation_budget={config.activation_budget} is out of reach for every copy fraction tried; "
                    f"the search kept the fewest feature maps that fit the rest ({over_bound[fraction]:.3f}x the "
                    f"base model's at copy_fraction={fraction}). Pass a larger activation_budget, or None to bound "
                    "the MACs only",
                    BudgetWarning,
                    stacklevel=4,
                )
                break
    if best is None:
        raise ValueError(
            f"mac_budget={config.mac_budget} is out of reach for every construction tried (with "
            f"activation_budget={config.activation_budget}): {'; '.join(reaches)}. Raise the budget these name, or "
            "use mode='truncate' (no added groups)"
        )
    return best[1], best[2], candidates
