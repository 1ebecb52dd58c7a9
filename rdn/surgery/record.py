"""``NestRecord``: what a Russian doll network *is*, as data: the surgery's options and what it found.

A :class:`~rdn.surgery.config.NestConfig` says what :func:`rdn.nest` was asked to do. Rebuilding
the network also needs what the surgery decided on the calibration data: the unit order of every
channel layout, the blocks a MAC budget dropped, the calibration input's shape. The record holds
both, with ``skip`` and ``depth_split`` resolved to module names, so that
``RussianDollNet.from_config(record)`` rebuilds the same structure from a base model of the same
architecture (weights then come from ``load_state_dict``).

Versions (the serialised form is :meth:`rdn.config.Config.to_dict`'s)::

    1   the flat dict of ``RussianDollNet.rdn_config`` before typed configs: options and findings side
        by side, ``{"version": 1, "k", "mode", ..., "orders", "pruned_blocks", ...}``; keys added
        later (select, seed, mac_budget, pruned_blocks, copy_fraction, compensate, ties, ...) may be
        missing and mean their defaults.
    2   ``{"kind": "NestRecord", "version": 2, "config": {NestConfig}, "input_shape", "orders",
        "pruned_blocks", "ties", "base"}``.

:meth:`NestRecord.to_legacy_dict` still writes the version-1 layout, for readers of
``rdn_config`` (a read-only compatibility view).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from rdn.config import Config, ConfigError, setting
from rdn.surgery.config import NestConfig

__all__ = ["NestRecord"]

# Keys every version-1 dict had from the start (the others were added later, with defaults).
_VERSION_1_REQUIRED = ("version", "k", "mode", "exact", "copies", "skip", "input_shape", "orders")
_FINDINGS = ("input_shape", "orders", "pruned_blocks", "ties", "base", "search")


def _from_version_1(values: dict[str, Any]) -> dict[str, Any]:
    """The flat version-1 ``rdn_config`` (without its "version") → version 2's fields."""
    missing = sorted(set(_VERSION_1_REQUIRED) - {"version"} - set(values))
    if missing:
        raise ConfigError(f"config misses the keys {missing}; pass RussianDollNet.rdn_config")
    options = {item.name for item in fields(NestConfig)}
    unknown = sorted(set(values) - options - set(_FINDINGS))
    if unknown:
        raise ConfigError(f"unknown rdn_config keys {unknown}")
    # Options missing from early version-1 dicts mean NestConfig's defaults (the values they had then).
    return {
        "config": {key: value for key, value in values.items() if key in options},
        "input_shape": values["input_shape"],
        "orders": values["orders"],
        "pruned_blocks": values.get("pruned_blocks") or {},
        "ties": values.get("ties"),  # not recorded before version 1 gained the key
        "base": values.get("base"),
    }


@dataclass(frozen=True)
class NestRecord(Config):
    """The options (``config``, ``skip`` and ``depth_split`` resolved to names) and findings of one surgery."""

    VERSION: ClassVar[int] = 2
    MIGRATIONS: ClassVar[dict] = {1: _from_version_1}

    config: NestConfig = setting(help="the surgery's options, skip and depth_split as qualified module names")
    input_shape: tuple[int, ...] = setting(help="shape of one calibration sample (C, H, W): shapes and costs")
    orders: dict[str, tuple[int, ...]] = setting(help="unit order of every channel layout (the selection's result)")
    pruned_blocks: dict[str, tuple[tuple[int, int], ...]] = setting(
        help="blocks (output group, input group) the MAC budget dropped, per nested layer"
    )
    ties: dict[str, dict[str, list[int]]] | None = setting(
        None, help="where tied calibration scores let the index decide: {'select': {layout: [primary groups]}, "
                   "'mac_budget': {layer: [output groups]}}; None: not recorded (older records)")  # fmt: skip
    base: dict[str, Any] | None = setting(None, help="rdn.models.create arguments that rebuild the base model")
    search: tuple[dict[str, Any], ...] | None = setting(
        None, help="the candidates the MAC budget's search scored (rdn.surgery.search.Candidate: copy_fraction, "
                   "compensate, mac_ratio, activation_ratio, repeated_exits, logit_error, agreement, note); None: no "
                   "search")  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.config, NestConfig):
            raise TypeError(f"config must be a NestConfig, got {type(self.config).__name__}")
        if self.config.copy_fraction is None or self.config.compensate is None:
            raise ValueError(
                "a NestRecord holds the options the surgery used, copy_fraction and compensate set (rdn.nest resolves "
                f"them), got copy_fraction={self.config.copy_fraction!r}, compensate={self.config.compensate!r}"
            )
        if not (self.config.skip is None or isinstance(self.config.skip, tuple)) or isinstance(
            self.config.depth_split, int
        ):
            raise ValueError(
                "a NestRecord holds skip and depth_split resolved to module names (rdn.nest resolves them), got "
                f"skip={self.config.skip!r}, depth_split={self.config.depth_split!r}"
            )
        # JSON gives lists: stored as the tuples the fields declare (records compare equal after a round trip).
        object.__setattr__(self, "input_shape", tuple(int(size) for size in self.input_shape))
        object.__setattr__(self, "orders", {str(k): tuple(int(u) for u in v) for k, v in self.orders.items()})
        pruned = {str(name): tuple((int(j), int(i)) for j, i in blocks) for name, blocks in self.pruned_blocks.items()}
        object.__setattr__(self, "pruned_blocks", {name: blocks for name, blocks in pruned.items() if blocks})
        for name in ("ties", "base"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"{name} must be a dict or None, got {type(value).__name__}")
        if self.search is not None:
            if not all(isinstance(candidate, dict) for candidate in self.search):
                raise TypeError(f"search must be a sequence of dicts or None, got {self.search!r}")
            object.__setattr__(self, "search", tuple(dict(candidate) for candidate in self.search))

    @classmethod
    def read(cls, data: NestRecord | dict[str, Any]) -> NestRecord:
        """A record from itself, its :meth:`to_dict` form or a version-1 ``rdn_config`` dict."""
        if isinstance(data, NestRecord):
            return data
        if not isinstance(data, dict):
            raise TypeError(
                f"config must be a NestRecord or the dict of RussianDollNet.rdn_config / NestRecord.to_dict(), "
                f"got {type(data).__name__}"
            )
        if "version" not in data:
            raise ConfigError("config has no 'version': pass RussianDollNet.rdn_config or NestRecord.to_dict()")
        return cls.from_dict(data)

    def differences(self, other: Config, ignore: Iterable[str] = ()) -> list[str]:
        """Differing fields by name, the options' own (``k``, ``mode``, ...) instead of ``config``."""
        if type(other) is not type(self):
            raise ConfigError(f"cannot compare a {type(self).__name__} with a {type(other).__name__}")
        skipped = set(ignore)
        options = [name for name in self.config.differences(other.config) if name not in skipped]
        found = [name for name in _FINDINGS if name not in skipped and getattr(self, name) != getattr(other, name)]
        return options + found

    def describe_differences(self, other: Config, ignore: Iterable[str] = ()) -> str:
        def value(record: NestRecord, name: str) -> Any:
            return getattr(record.config if name not in _FINDINGS else record, name)

        return ", ".join(
            f"{name}: {value(other, name)!r} -> {value(self, name)!r}" for name in self.differences(other, ignore)
        )

    def to_legacy_dict(self) -> dict[str, Any]:
        """The flat version-1 layout of ``RussianDollNet.rdn_config`` (every key, lists for tuples)."""
        config = self.config
        return {
            "version": 1,
            "k": config.k,
            "mode": config.mode,
            "exact": config.exact,
            "copies": config.copies,
            "select": config.select,
            "seed": config.seed,
            "skip": list(config.skip or ()),
            "input_shape": list(self.input_shape),
            "orders": {layout: list(order) for layout, order in self.orders.items()},
            "depth_split": config.depth_split,
            "base": copy.deepcopy(self.base),
            "copy_fraction": config.copy_fraction,
            "mac_budget": config.mac_budget,
            "pruned_blocks": {name: [list(block) for block in blocks] for name, blocks in self.pruned_blocks.items()},
            "compensate": config.compensate,
            "norms": config.norms,
            "ties": copy.deepcopy(self.ties),
        }
