"""``NestConfig``: the options of the surgery (what :func:`rdn.nest` is asked to do), typed and checked.

What the surgery *found* (channel orders, pruned blocks, the calibration input's shape) is not
an option: it lives in the network's record beside this config. Model-dependent forms of
``skip`` and ``depth_split`` (modules rather than names) are resolved by :func:`rdn.nest` before
they are stored here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rdn.config import Config, setting

__all__ = ["COPIES", "MODES", "NORMS", "SELECTIONS", "NestConfig"]

MODES = ("expand", "truncate")
COPIES = ("sum", "latest")
SELECTIONS = ("greedy", "random")
NORMS = ("fixed", "grouped")


@dataclass(frozen=True)
class NestConfig(Config):
    """How to nest a base model into a Russian doll network (see :func:`rdn.nest` for each option)."""

    k: int = setting(4, "channel groups per nested layer (expand: K = 2k - 1 sub-networks)")
    mode: str = setting("expand", "expand re-routes connections that break the nesting into k - 1 new groups; "
                                  "truncate drops them", choices=MODES)  # fmt: skip
    select: str = setting("greedy", "channel selection: greedy (paper Algorithm 1, on calibration images) or random",
                          choices=SELECTIONS)  # fmt: skip
    copies: str = setting("latest", "what a channel copy holds: a whole value (latest) or partial sums (sum)",
                          choices=COPIES)  # fmt: skip
    exact: bool = setting(True, "expand keeps every connection (N_K is exactly the base model, about 2x its "
                                "MACs); --no-exact: at most two copies of a channel, fewer MACs")  # fmt: skip
    copy_fraction: float = setting(1.0, "with --no-exact: share of each group's channels that get copies in the "
                                        "added groups (fewer channels in the larger sub-networks)")  # fmt: skip
    mac_budget: float | None = setting(None, "expand: drop blocks of the added groups until N_K does at most this "
                                             "many times the base model's MACs (e.g. 1.15 with --no-exact)")
    compensate: bool = setting(False, "refit the copies that miss inputs (dropped or pruned connections) by least "
                                      "squares on the calibration images, layer by layer")  # fmt: skip
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
        for name in ("exact", "compensate"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        self._check_copy_fraction()
        self._check_mac_budget()
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
        if self.mode != "expand":
            raise ValueError(f"mac_budget drops blocks of the groups expand mode adds; mode={self.mode!r} has none")

    @property
    def num_subnets(self) -> int:
        """K: 2k - 1 in expand mode, k in truncate mode (before any depth split doubles the exits)."""
        return 2 * self.k - 1 if self.mode == "expand" else self.k


def _check_int(name: str, value, minimum: int | None = None, meaning: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{f' >= {minimum}' if minimum is not None else ''}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}{f' ({meaning})' if meaning else ''} must be >= {minimum}, got {value}")
