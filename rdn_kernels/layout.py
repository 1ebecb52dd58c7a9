"""Block layout of a nested (block-lower-triangular) layer.

A nested layer splits its C input channels into K groups (``in_splits``) and its D output
channels into K groups (``out_splits``). Block ``(j, i)`` of the dense-shaped weight connects
input group ``i`` to output group ``j`` and exists when ``mask[j][i]`` is true; the mask is
lower-triangular, so output group ``j`` only ever reads input groups ``i <= j``.

Every backend walks the same structure: for each destination group, the *runs* of contiguous
channels it reads. Coalescing adjacent blocks into runs is what turns the triangle into a few
wide GEMMs instead of K² narrow ones.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import torch

Run = tuple[int, int]  # a half-open channel range [start, stop)


@dataclass(frozen=True)
class NestedLayout:
    """Validated splits and block mask of one nested layer (see module docstring)."""

    in_splits: tuple[int, ...]
    out_splits: tuple[int, ...]
    mask: tuple[tuple[bool, ...], ...]

    # K + 1 channel offsets: input group i is channels [in_offsets[i], in_offsets[i+1]).
    in_offsets: tuple[int, ...] = field(init=False)
    out_offsets: tuple[int, ...] = field(init=False)
    # The mask row by row (K² bools), as the compiled kernels take it.
    flat_mask: tuple[bool, ...] = field(init=False)

    @property
    def num_groups(self) -> int:
        return len(self.in_splits)

    def __post_init__(self) -> None:
        # Plain fields rather than cached properties: torch.compile traces this class.
        object.__setattr__(self, "in_offsets", (0, *accumulate(self.in_splits)))
        object.__setattr__(self, "out_offsets", (0, *accumulate(self.out_splits)))
        object.__setattr__(self, "flat_mask", tuple(bool(m) for row in self.mask for m in row))


    def input_runs(self, j: int) -> tuple[Run, ...]:
        """Contiguous input-channel ranges read by output group ``j`` (empty groups dropped)."""
        return _coalesce(
            (self.in_offsets[i], self.in_offsets[i + 1])
            for i in range(j + 1)
            if self.mask[j][i] and self.in_splits[i] > 0
        )

    def output_runs(self, i: int, lo: int, hi: int) -> tuple[Run, ...]:
        """Contiguous output-channel ranges of groups ``lo <= j < hi`` that read input group ``i``.

        This is the transposed (upper-triangular) structure that grad-input walks.
        """
        return _coalesce(
            (self.out_offsets[j], self.out_offsets[j + 1])
            for j in range(max(lo, i), hi)
            if self.mask[j][i] and self.out_splits[j] > 0
        )

    def useful_macs_per_pixel(self, lo: int = 0, hi: int | None = None) -> int:
        """Σ over blocks (j, i) in the mask with lo <= j < hi of d_j · c_i."""
        hi = self.num_groups if hi is None else hi
        return sum(
            self.out_splits[j] * self.in_splits[i]
            for j in range(lo, hi)
            for i in range(j + 1)
            if self.mask[j][i]
        )


def _coalesce(ranges) -> tuple[Run, ...]:
    runs: list[list[int]] = []
    for start, stop in ranges:
        if runs and runs[-1][1] == start:
            runs[-1][1] = stop
        else:
            runs.append([start, stop])
    return tuple((start, stop) for start, stop in runs)


def _as_splits(name: str, splits) -> tuple[int, ...]:
    if isinstance(splits, torch.Tensor):
        splits = splits.tolist()
    if isinstance(splits, (str, bytes)) or not isinstance(splits, Sequence):
        raise TypeError(f"{name} must be a sequence of non-negative ints, got {type(splits).__name__}")
    values = []
    for value in splits:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must contain ints, got {value!r} in {list(splits)}")
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {list(splits)}")
        values.append(value)
    if not values:
        raise ValueError(f"{name} must name at least one group, got an empty sequence")
    return tuple(values)


def _as_mask(block_mask, num_groups: int) -> tuple[tuple[bool, ...], ...]:
    if block_mask is None:
        return tuple(tuple(i <= j for i in range(num_groups)) for j in range(num_groups))
    if isinstance(block_mask, torch.Tensor):
        if block_mask.dtype != torch.bool:
            raise TypeError(f"block_mask must be a bool tensor, got dtype {block_mask.dtype}")
        if block_mask.shape != (num_groups, num_groups):
            raise ValueError(
                f"block_mask must have shape ({num_groups}, {num_groups}) for K={num_groups} "
                f"groups, got {tuple(block_mask.shape)}"
            )
        rows = block_mask.tolist()
    else:
        try:
            rows = [list(row) for row in block_mask]
        except TypeError:
            raise TypeError(
                f"block_mask must be a (K, K) bool tensor or nested list, got {type(block_mask).__name__}"
            ) from None
        if len(rows) != num_groups or any(len(row) != num_groups for row in rows):
            raise ValueError(
                f"block_mask must be {num_groups}×{num_groups} for K={num_groups} groups, "
                f"got row lengths {[len(row) for row in rows]}"
            )
        for row in rows:
            for value in row:
                if not isinstance(value, (bool, int)) or value not in (0, 1):
                    raise TypeError(f"block_mask entries must be bools, got {value!r}")
    for j, row in enumerate(rows):
        for i in range(j + 1, num_groups):
            if row[i]:
                raise ValueError(
                    f"block_mask must be lower-triangular (output group j reads only input groups "
                    f"i <= j), but block_mask[{j}][{i}] is true"
                )
    return tuple(tuple(bool(value) for value in row) for row in rows)


def make_layout(in_splits, out_splits, block_mask=None) -> NestedLayout:
    """Validate splits and mask and return the (cached) layout."""
    # Hottest path: a module passes the same tuple objects on every call. Tuples are immutable and
    # the cache keeps them alive (so their ids are not reused): the same objects, the same layout.
    key = (id(in_splits), id(out_splits), id(block_mask))
    entry = _layouts_by_identity.get(key)
    if entry is not None and entry[0] is in_splits and entry[1] is out_splits and entry[2] is block_mask:
        return entry[3]
    if _exact_int_tuple(in_splits) and _exact_int_tuple(out_splits) and _exact_bool_rows(block_mask):
        # Hot path (modules call with tuples): validated once per distinct layout.
        layout = _validated_layout(in_splits, out_splits, block_mask)
        if len(_layouts_by_identity) >= _IDENTITY_CACHE_SIZE:
            _layouts_by_identity.clear()
        _layouts_by_identity[key] = (in_splits, out_splits, block_mask, layout)
        return layout
    return _validated_layout.__wrapped__(in_splits, out_splits, block_mask)


_IDENTITY_CACHE_SIZE = 4096
_layouts_by_identity: dict[tuple[int, int, int], tuple[Any, Any, Any, NestedLayout]] = {}


def _exact_int_tuple(value) -> bool:
    # Exact types only: 2 == 2.0 == True hash alike, and a cache hit must not skip a TypeError.
    return type(value) is tuple and all(type(v) is int for v in value)


def _exact_bool_rows(mask) -> bool:
    return mask is None or (
        type(mask) is tuple and all(type(row) is tuple and all(type(v) is bool for v in row) for row in mask)
    )


@functools.lru_cache(maxsize=4096)
def _validated_layout(in_splits, out_splits, block_mask) -> NestedLayout:
    in_splits = _as_splits("in_splits", in_splits)
    out_splits = _as_splits("out_splits", out_splits)
    if len(in_splits) != len(out_splits):
        raise ValueError(
            f"in_splits and out_splits must have the same number of groups K, got "
            f"{len(in_splits)} and {len(out_splits)}"
        )
    return NestedLayout(in_splits, out_splits, _as_mask(block_mask, len(in_splits)))


def check_stages(stages: Any, num_groups: int) -> tuple[int, int]:
    """``stages`` as ``(lo, hi)`` with ``0 <= lo < hi <= num_groups``; ``None`` is all groups."""
    if stages is None:
        return 0, num_groups
    if type(stages) is tuple and len(stages) == 2 and type(stages[0]) is int and type(stages[1]) is int:
        lo, hi = stages  # the usual form, checked without generators: this runs on every call
        if 0 <= lo < hi <= num_groups:
            return lo, hi
    if (
        not isinstance(stages, (tuple, list))
        or len(stages) != 2
        or any(isinstance(s, bool) or not isinstance(s, int) for s in stages)
    ):
        raise TypeError(f"stages must be a pair of ints (lo, hi), got {stages!r}")
    lo, hi = stages
    if not 0 <= lo < hi <= num_groups:
        raise ValueError(f"stages must satisfy 0 <= lo < hi <= K={num_groups}, got {tuple(stages)}")
    return lo, hi
