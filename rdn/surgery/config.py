"""``NestConfig``: the options of the surgery (what :func:`rdn.nest` is asked to do), typed and checked.

What the surgery *found* (channel orders, pruned blocks, the calibration input's shape) is not
an option: it lives in the network's record beside this config. Model-dependent forms of
``skip`` and ``depth_split`` (modules rather than names) are resolved by :func:`rdn.nest` before
they are stored here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from rdn.config import Config, setting

__all__ = [
    "COPIES",
    "COPY_FRACTIONS",
    "DEFAULT_ACTIVATION_BUDGET",
    "DEFAULT_MAC_BUDGET",
    "MODES",
    "NORMS",
    "SELECTIONS",
    "NestConfig",
    "refuse_unused_budget",
]

MODES = ("expand", "truncate")
COPIES = ("sum", "latest")
SELECTIONS = ("greedy", "random")
NORMS = ("fixed", "grouped")
# N_K's MACs over the base model's by default: near the paper's RDNs (its Table 1: 1.11-1.16x).
DEFAULT_MAC_BUDGET = 1.2
# N_K's feature-map elements over the base model's by default (costs.activation_elements). A training
# step's time follows the feature maps more than the MACs (BN, activations and depthwise convs are
# memory-bound): on MobileNetV2 the joint step's time ratio is 0.03-0.10 above this one
# (benchmarks/results/training_cost_cpu.md), so 1.1 keeps the step within 1.2x the base's.
DEFAULT_ACTIVATION_BUDGET = 1.1
# The shares of copied channels the budget's search tries (rdn.surgery.search), most copies first.
COPY_FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.125)


def _from_version_1(values: dict[str, Any]) -> dict[str, Any]:
    """Version 1 (before the MAC budget was the first knob): exact surgery by default, no budget, every
    copy, no compensation; a missing key meant those values."""
    return {"exact": True, "mac_budget": None, "copy_fraction": 1.0, "compensate": False, **values}


def _from_version_2(values: dict[str, Any]) -> dict[str, Any]:
    """Version 2 (the MAC budget alone): no feature-map budget."""
    return {"activation_budget": None, **values}


@dataclass(frozen=True)
class NestConfig(Config):
    """How to nest a base model into a Russian doll network (see :func:`rdn.nest` for each option).

    The cost of N_K is the first knob: by default (``mac_budget=1.2``, ``activation_budget=1.1``)
    the surgery chooses the share of copied channels, the dropped blocks and the compensation that
    fit N_K into 1.2x the base model's MACs and 1.1x its feature-map elements with the least error
    against the base's logits on the calibration images (:mod:`rdn.surgery.search`).
    ``exact=True`` instead keeps every connection (N_K is the base model, about 2x its MACs) and
    takes no budget. ``copy_fraction`` and ``compensate`` left unset (None) are chosen by the
    search (without a budget: every copy, no refit); set, they restrict it (a set
    ``copy_fraction`` leaves ``activation_budget`` nothing to bound: it is dropped). A network's
    record holds the values the surgery used (:meth:`resolved`).

    Versions: 1 (exact surgery, no budget, every copy and no compensation by default), 2 (the MAC
    budget by default; ``copy_fraction`` / ``compensate`` may be None), 3 (the feature-map budget).
    """

    VERSION: ClassVar[int] = 3
    MIGRATIONS: ClassVar[dict] = {1: _from_version_1, 2: _from_version_2}

    k: int = setting(4, "channel groups per nested layer (expand: K = 2k - 1 sub-networks)")
    mode: str = setting("expand", "expand re-routes connections that break the nesting into k - 1 new groups; "
                                  "truncate drops them", choices=MODES)  # fmt: skip
    select: str = setting("greedy", "channel selection: greedy (paper Algorithm 1, on calibration images) or random",
                          choices=SELECTIONS)  # fmt: skip
    copies: str = setting("latest", "what a channel copy holds: a whole value (latest) or partial sums (sum)",
                          choices=COPIES)  # fmt: skip
    exact: bool = setting(False, "expand keeps every connection: N_K is exactly the base model before "
                                 "fine-tuning, at about 2x its MACs (takes no mac_budget); --no-exact: at most two "
                                 "copies of a channel")  # fmt: skip
    copy_fraction: float | None = setting(None, "without exact: share of each group's channels that get copies "
                                                "in the added groups (fewer channels in the larger sub-networks); "
                                                "not set: chosen by the MAC budget's search (1 without a budget)")
    mac_budget: float | None = setting(DEFAULT_MAC_BUDGET, "expand without exact: N_K does at most this many times "
                                                           "the base model's MACs; the surgery chooses copies, "
                                                           "dropped blocks and compensation with the least "
                                                           "calibration error (rdn.surgery.search); not set: no "
                                                           "budget")  # fmt: skip
    activation_budget: float | None = setting(
        DEFAULT_ACTIVATION_BUDGET, "expand without exact: N_K computes at most this many times the base model's "
                                   "feature-map elements (what a training step's time and memory follow, beside the "
                                   "MACs): the budget's search keeps the copy fractions that fit; not set: MACs "
                                   "only (the default is dropped where nothing is searched: exact, truncate, no "
                                   "mac_budget, copy_fraction set)")  # fmt: skip
    compensate: bool | None = setting(None, "refit the copies that miss inputs (dropped or pruned connections) "
                                            "by least squares on the calibration images, layer by layer; not "
                                            "set: chosen by the MAC budget's search (off without a budget)")
    norms: str = setting("fixed", "norms that couple channels (LayerNorm over channels, GroupNorm): fixed keeps "
                                  "them and what they read un-nested (the paper); grouped takes their statistics per "
                                  "channel group, so they nest (not the base function: fine-tune)",
                         choices=NORMS)  # fmt: skip
    seed: int = setting(0, "seed of random selection")
    skip: int | tuple[str, ...] | None = setting(
        None, "layers kept un-nested: a count of leading nestable layers or qualified module names; not set: the "
              "stem and first two blocks of rdn.models, else the layers at output stride <= 4 (at most a quarter "
              "of the nestable layers)", cli=False)  # fmt: skip
    depth_split: int | str | None = setting(
        None, "a shallow exit per width after this block (index into model.blocks, or a module name)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("k", self.k, minimum=1, meaning="number of channel groups per layer")
        _check_int("seed", self.seed)
        if not isinstance(self.exact, bool):
            raise TypeError(f"exact must be a bool, got {self.exact!r}")
        if self.compensate is not None and not isinstance(self.compensate, bool):
            raise TypeError(f"compensate must be a bool or None (chosen by the MAC budget's search), got "
                            f"{self.compensate!r}")  # fmt: skip
        self._check_mac_budget()
        self._check_activation_budget()
        self._check_copy_fraction()
        if self.compensate and self.copies != "latest":
            raise ValueError("compensate=True needs copies='latest' (every copy a whole value)")
        if isinstance(self.skip, list):  # JSON's lists: stored as the tuple the field declares
            object.__setattr__(self, "skip", tuple(self.skip))
        if isinstance(self.skip, bool) or not (self.skip is None or isinstance(self.skip, (int, tuple))):
            raise TypeError(f"skip must be an int, a sequence of module names, or None, got {self.skip!r}")
        if isinstance(self.skip, int) and self.skip < 0:
            raise ValueError(f"skip (number of leading nestable layers kept un-nested) must be >= 0, got {self.skip}")
        if isinstance(self.skip, tuple) and not all(isinstance(name, str) and name for name in self.skip):
            raise TypeError(f"skip names must be non-empty strings (qualified module names), got {self.skip!r}")
        if isinstance(self.depth_split, bool) or not (
            self.depth_split is None or isinstance(self.depth_split, (int, str))
        ):
            raise TypeError(f"depth_split must be a block index, a module name or None, got {self.depth_split!r}")

    def _check_copy_fraction(self) -> None:
        value = self.copy_fraction
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"copy_fraction must be a number in [0, 1], got {value!r}")
        if not 0 <= value <= 1:
            raise ValueError(f"copy_fraction (share of each group's channels that get copies) must be in [0, 1], "
                             f"got {value}")  # fmt: skip
        if value < 1 and (self.mode != "expand" or self.exact):
            raise ValueError(
                f"copy_fraction < 1 drops the connections of the channels without copies: it needs mode='expand' and "
                f"exact=False, got mode={self.mode!r}, exact={self.exact}"
            )

    def _check_mac_budget(self) -> None:
        value = self.mac_budget
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"mac_budget must be a finite number (N_K's MACs / the base's) or None, got {value!r}")
        if value <= 0:
            raise ValueError(f"mac_budget (N_K's MACs / the base model's) must be > 0, got {value}")
        # The default budget is for the default construction; exact and truncate surgeries do not take one
        # (truncate's N_K never exceeds the base): the default leaves them, another value is refused.
        if self.exact or self.mode != "expand":
            if value == DEFAULT_MAC_BUDGET:
                object.__setattr__(self, "mac_budget", None)
            elif self.mode != "expand":
                raise ValueError(
                    f"mac_budget drops blocks of the groups expand mode adds; mode={self.mode!r} has none"
                )
            else:
                raise ValueError(
                    f"exact=True keeps every connection (N_K is the base model, about 2x its MACs) and takes no "
                    f"mac_budget, got mac_budget={value}; pass exact=False to fit a budget"
                )

    def _check_activation_budget(self) -> None:
        value = self.activation_budget
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"activation_budget must be a finite number (N_K's feature-map elements / the base's) or "
                            f"None, got {value!r}")  # fmt: skip
        if value < 1:
            raise ValueError(f"activation_budget (N_K's feature-map elements / the base model's) must be >= 1: N_K "
                             f"computes every channel of the base model, got {value}")  # fmt: skip
        # Like the MAC budget's default, this one belongs to the budget's search, and only its choice of
        # copy_fraction moves the feature maps: without a search (exact, truncate, no MAC budget) or with
        # copy_fraction set (as a record holds it) the default is dropped and another value refused.
        if self.exact or self.mode != "expand" or self.mac_budget is None or self.copy_fraction is not None:
            if value == DEFAULT_ACTIVATION_BUDGET:
                object.__setattr__(self, "activation_budget", None)
            else:
                raise ValueError(
                    f"activation_budget bounds the copy_fraction the MAC budget's search chooses (expand mode, "
                    f"exact=False, mac_budget set, copy_fraction not set), got activation_budget={value} with "
                    f"mode={self.mode!r}, exact={self.exact}, mac_budget={self.mac_budget}, "
                    f"copy_fraction={self.copy_fraction}"
                )

    def resolved(self) -> NestConfig:
        """The options with the unset choices as the surgery takes them without a search: every copy
        (``copy_fraction=1``), no refit. (With a budget, the search sets them instead.)"""
        return self.replace(copy_fraction=1.0 if self.copy_fraction is None else self.copy_fraction,
                            compensate=bool(self.compensate))  # fmt: skip

    @property
    def num_subnets(self) -> int:
        """K: 2k - 1 in expand mode, k in truncate mode (before any depth split doubles the exits)."""
        return 2 * self.k - 1 if self.mode == "expand" else self.k


def refuse_unused_budget(given: float | None, config: NestConfig, given_activations: float | None = None) -> None:
    """Raise ValueError when a budget the user gave (``given``: ``--mac-budget``; ``given_activations``:
    ``--activation-budget``) ends up unused in ``config``: the exact and truncate surgeries take none,
    and a budget equal to the default is dropped silently by :class:`NestConfig` (it cannot tell a
    given default from the default)."""
    for name, value, kept in (("mac_budget", given, config.mac_budget),
                              ("activation_budget", given_activations, config.activation_budget)):  # fmt: skip
        if value is not None and kept is None:
            raise ValueError(
                f"{name}={value} applies to expand mode without exact (the budget's search); this surgery is "
                f"mode={config.mode!r}, exact={config.exact}: add --no-exact (or exact=False) to fit the budget"
            )


def _check_int(name: str, value, minimum: int | None = None, meaning: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{f' >= {minimum}' if minimum is not None else ''}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}{f' ({meaning})' if meaning else ''} must be >= {minimum}, got {value}")
