"""Channel spaces: how the channels of one tensor of the base model are laid out in the RDN.

Every tensor of the base model that carries channels (dim 1) belongs to a *channel space*.
Layers that act per channel (BN, activations, depthwise / grouped convs, residual adds, pooling)
keep their input's space; a nested conv creates a new one. A space says, for every channel of
the RDN tensor, which original channel it is a copy of and which of the K nesting groups holds it.
Channels are stored group by group, so group ``q`` is the slice ``offsets[q]:offsets[q+1]``.

Construction ("ladder"). The original channels are cut into *units* (1 channel, or one conv
group when a grouped conv reads the tensor: its channels must move together) and the units are
ordered by the selection (greedy or random) into k *primary groups* g = 0..k-1. Every unit of
primary group g has copies at the groups of its *rungs* ``rungs[g]`` = (g, r_1, r_2, ...), strictly
increasing; copy 0 is the primary. A nested conv writing the space computes, for original output
channel o, ``y_o = Σ_c W[o, c] x_c``; every input channel copy x̃ (at input group G) is read by
exactly one copy of o: the lowest rung q >= G. The copy at rung q therefore reads the input
groups in (previous rung, q], which keeps the layer block-lower-triangular, and the copies of o
sum to ``y_o`` exactly. The layer that reads the space sees the copies as separate channels with
o's weights ("inflation"), so before any non-linearity it computes what the base layer did.

What a copy holds (``copies``):

- ``"sum"`` (DESIGN.md §4.2): copies are partial sums. The copy of o at rung q reads
  every input copy at groups in (previous rung, q]; each input copy is read by exactly one copy
  of o, biases and BN shifts go on the primary only, so the copies add up to the base value and
  a stack without non-linearities is reproduced exactly by N_K. Through a non-linearity
  ``f(a) + f(b) != f(a + b)``: approximate.
- ``"latest"`` (the default of :func:`rdn.surgery.nest`): every copy is a whole value,
  recomputed from the inputs available at its group.
  The copy of o at rung q reads, of every input channel, its latest copy at a group <= q (so
  each input copy is read by the outputs between its group and the next copy's); every copy gets
  the bias and the full BN; a consumer uses the latest copy (the heads' alignment selects it).
  With ``exact`` every channel's last copy is at group K - 1 and reads the inputs' last copies,
  so N_K equals the base network exactly, non-linearities included.

Ladders by mode (0-based groups, k primary groups):

- ``truncate``: K = k, rungs = (g,): connections from input groups > g are dropped.
- ``expand``: K = 2k - 1, rungs drawn from (g, k + g [if g < k - 1], K - 1 [if exact]): the
  secondary copy at k + g takes the connections the primary cannot read (DESIGN.md §4.2); with
  ``exact`` a last copy at group K - 1 takes what the secondary cannot read either (inputs that
  are themselves late copies), so every connection is kept. A rung is only created when some
  input group needs it (see :mod:`rdn.surgery.graph`).

Partial copies (``nest(..., copy_fraction=f)``, expand without ``exact``): only the first
``copied[g]`` units of primary group g (in ``order``; the selection puts the units that lose the
most energy to the nesting first) have the later rungs; the others keep only their primary, whose
connections from later input groups are dropped as in truncate mode.

A space with every channel in group 0 (``single_group``) is an un-nested tensor: the stem and the
skipped blocks; N_1 already computes all of it.

Concatenations (:class:`ConcatSpace`): ``torch.cat`` on the channels of tensors in spaces P_1..P_m
gives a space whose group q is P_1's group q, then P_2's, ...: every prefix of groups is the
parts' prefixes, so N_s concatenates what it has of each part.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import Tensor, nn


def ladder(primary_group: int, k: int, mode: str, exact: bool) -> tuple[int, ...]:
    """Candidate rungs (0-based groups) of a unit in ``primary_group`` (see module docstring)."""
    if mode == "truncate":
        return (primary_group,)
    last = 2 * k - 2
    rungs = [primary_group]
    if primary_group < k - 1:
        rungs.append(k + primary_group)
    if exact and rungs[-1] != last:
        rungs.append(last)
    return tuple(rungs)


def num_groups_for(k: int, mode: str) -> int:
    """K: the number of nesting groups (sub-networks) a surgery with k primary groups produces."""
    return k if mode == "truncate" else 2 * k - 1


class _ChannelTable:
    """What every channel space gives per RDN channel, from its ``_layout`` table (source, group,
    rung, previous and next rung group, splits): shared by :class:`ChannelSpace` and :class:`ConcatSpace`."""

    num_groups: int

    @property
    def _layout(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, tuple[int, ...]]:
        raise NotImplementedError

    @property
    def source(self) -> Tensor:
        """(len,) long: the original channel each RDN channel is a copy of."""
        return self._layout[0]

    @property
    def group(self) -> Tensor:
        """(len,) long: the nesting group (0-based) of each RDN channel, non-decreasing."""
        return self._layout[1]

    @property
    def rung(self) -> Tensor:
        """(len,) long: 0 for the primary copy, 1, 2 for later copies."""
        return self._layout[2]

    @property
    def previous_rung_group(self) -> Tensor:
        """(len,) long: group of the copy below this one (-1 for a primary)."""
        return self._layout[3]

    @property
    def next_rung_group(self) -> Tensor:
        """(len,) long: group of the copy above this one (K for the last copy)."""
        return self._layout[4]

    @property
    def splits(self) -> tuple[int, ...]:
        """K channel counts, one per nesting group (zeros allowed)."""
        return self._layout[5]

    @functools.cached_property
    def offsets(self) -> tuple[int, ...]:
        return (0, *accumulate(self.splits))

    def __len__(self) -> int:
        return self.offsets[-1]

    def occupied_groups(self) -> set[int]:
        return {q for q, size in enumerate(self.splits) if size}

    @functools.cached_property
    def primary_group_of_channel(self) -> Tensor:
        """(channels,) long: the primary group of each *original* channel."""
        groups = torch.empty(self.channels, dtype=torch.long)
        primary = self.rung == 0
        groups[self.source[primary]] = self.group[primary]
        return groups


@dataclass(frozen=True)
class ChannelSpace(_ChannelTable):
    """Layout of one RDN tensor's channels (module docstring).

    Attributes:
        num_groups: K.
        channels: the original channel count.
        unit: original channels per unit (they move together).
        order: unit indices in nesting order; the first ``primary_sizes[0]`` form primary group 0, ...
        primary_sizes: units per primary group.
        rungs: per primary group, the increasing groups that hold its copies (``rungs[g][0] == g``).
        copied: per primary group, how many of its units (the first ones in ``order``) have the
            copies of ``rungs[g][1:]``; the others only their primary. ``None``: all of them.
    """

    num_groups: int
    channels: int
    unit: int
    order: tuple[int, ...]
    primary_sizes: tuple[int, ...]
    rungs: tuple[tuple[int, ...], ...]
    copied: tuple[int, ...] | None = None

    @classmethod
    def single_group(cls, channels: int, num_groups: int) -> ChannelSpace:
        """An un-nested tensor: every channel in group 0, no copies."""
        return cls(num_groups, channels, 1, tuple(range(channels)), (channels,), ((0,),))

    @property
    def is_single_group(self) -> bool:
        return self.rungs == ((0,),)

    @functools.cached_property
    def _layout(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, tuple[int, ...]]:
        starts = (0, *accumulate(self.primary_sizes))
        source, group, rung, previous, following = [], [], [], [], []
        splits = []
        copied = self.primary_sizes if self.copied is None else self.copied
        for q in range(self.num_groups):
            size = 0
            for g, all_rungs in enumerate(self.rungs):
                if q not in all_rungs:
                    continue
                r = all_rungs.index(q)
                for position, unit in enumerate(self.order[starts[g] : starts[g + 1]]):
                    rungs = all_rungs if position < copied[g] else all_rungs[:1]
                    if q not in rungs:
                        continue
                    channels = range(unit * self.unit, (unit + 1) * self.unit)
                    source.extend(channels)
                    group.extend([q] * self.unit)
                    rung.extend([r] * self.unit)
                    previous.extend([rungs[r - 1] if r else -1] * self.unit)
                    following.extend([rungs[r + 1] if r + 1 < len(rungs) else self.num_groups] * self.unit)
                    size += self.unit
            splits.append(size)
        as_long = functools.partial(torch.tensor, dtype=torch.long)
        tensors = (as_long(values) for values in (source, group, rung, previous, following))
        return (*tensors, tuple(splits))

    def derived(self, channels: int, unit: int) -> ChannelSpace:
        """The same units, groups and copies over another tensor (a grouped conv's output)."""
        return ChannelSpace(self.num_groups, channels, unit, self.order, self.primary_sizes, self.rungs, self.copied)

    def to_config(self) -> dict:
        return {
            "order": list(self.order),
            "primary_sizes": list(self.primary_sizes),
            "rungs": [list(r) for r in self.rungs],
            "copied": None if self.copied is None else list(self.copied),
        }


@dataclass(frozen=True)
class ConcatSpace(_ChannelTable):
    """The channels of a concatenation (``torch.cat`` on dim 1) of tensors in the spaces ``parts``.

    Its original channels are the parts' one after the other (as the base model concatenates
    them); its RDN channels are stored group by group, and within group q part after part (each
    part's group-q channels in its own order). So the first s groups of the concatenation are the
    concatenation of the parts' first s groups: every prefix is a sub-network's tensor, and a stage
    computes its new groups from the parts' new groups. A part may be single-group (un-nested): it
    lies in group 0.
    """

    num_groups: int
    parts: tuple[ChannelSpace, ...]

    @property
    def channels(self) -> int:
        return sum(part.channels for part in self.parts)

    @property
    def is_single_group(self) -> bool:
        return all(part.is_single_group for part in self.parts)

    @functools.cached_property
    def _layout(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, tuple[int, ...]]:
        starts = (0, *accumulate(part.channels for part in self.parts))
        pieces: list[list[Tensor]] = [[] for _ in range(5)]
        for q in range(self.num_groups):
            for start, part in zip(starts, self.parts, strict=False):
                cut = slice(part.offsets[q], part.offsets[q + 1])
                values = (part.source[cut] + start, part.group[cut], part.rung[cut],
                          part.previous_rung_group[cut], part.next_rung_group[cut])  # fmt: skip
                for piece, value in zip(pieces, values, strict=True):
                    piece.append(value)
        splits = tuple(sum(part.splits[q] for part in self.parts) for q in range(self.num_groups))
        empty = torch.zeros(0, dtype=torch.long)
        return (*(torch.cat(piece) if piece else empty for piece in pieces), splits)

    def to_config(self) -> dict:
        return {"parts": [part.to_config() for part in self.parts]}


Space = ChannelSpace | ConcatSpace


def concat_groups(values: list[Tensor | None], spaces: list[Space], lo: int, hi: int) -> Tensor:
    """Groups ``lo..hi-1`` of the concatenation (:class:`ConcatSpace`) of ``values``.

    ``values[i]`` holds at least the channels of groups ``lo..hi-1`` of ``spaces[i]``, starting at
    that space's offset of group ``lo`` (a prefix when ``lo = 0``); single-group parts, which lie in
    group 0, may be whole; a part without channels in those groups may be None. At least one part
    must have channels there.
    """
    pieces = []
    for q in range(lo, hi):
        for value, space in zip(values, spaces, strict=True):
            if space.splits[q]:
                base = space.offsets[lo]
                pieces.append(value[:, space.offsets[q] - base : space.offsets[q + 1] - base])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)


# ----------------------------------------------------------------------------------------------
# Inflation of the layers that read or write a space
# ----------------------------------------------------------------------------------------------


def nested_parameters(
    weight: Tensor, bias: Tensor | None, in_space: ChannelSpace, out_space: ChannelSpace, copies: str
) -> tuple[Tensor, Tensor | None]:
    """Weight and bias of the nested layer replacing a plain conv / linear layer.

    Args:
        weight: (d, c, ...) of the base layer; bias (d,) or None.
        copies: ``"sum"`` or ``"latest"`` (module docstring).
    Returns:
        weight (len(out), len(in), ...): copy o' (at group q) of output o reads input copy c' of c
        (at group G) with W[o, c] when, for ``"sum"``, ``previous_rung_group(o') < G <= q`` and,
        for ``"latest"``, ``G <= q < next_rung_group(c')``; else 0. The bias (on primaries only
        for ``"sum"``). The blocks holding any connection: :func:`block_mask`.
    """
    w = weight.detach()[out_space.source][:, in_space.source]
    reads = connections(in_space, out_space, copies).to(w.device)
    w = w * reads.view(*reads.shape, *(1,) * (w.dim() - 2)).to(w.dtype)
    return w, offsets_on_copies(bias, out_space, copies)


def block_mask(in_space: ChannelSpace, out_space: ChannelSpace, copies: str) -> tuple[tuple[bool, ...], ...]:
    """(K, K) lower-triangular: whether block (output group j, input group i) holds any connection of
    :func:`nested_parameters`' weight."""
    reads = connections(in_space, out_space, copies)
    out_offsets, in_offsets = out_space.offsets, in_space.offsets
    return tuple(
        tuple(
            i <= j and bool(reads[out_offsets[j] : out_offsets[j + 1], in_offsets[i] : in_offsets[i + 1]].any())
            for i in range(in_space.num_groups)
        )
        for j in range(out_space.num_groups)
    )


def connections(in_space: ChannelSpace, out_space: ChannelSpace, copies: str) -> Tensor:
    """(len(out), len(in)) bool: which input copy each output copy reads (:func:`nested_parameters`)."""
    in_group, out_group = in_space.group[None, :], out_space.group[:, None]
    if copies == "sum":
        return (out_space.previous_rung_group[:, None] < in_group) & (in_group <= out_group)
    return (in_group <= out_group) & (out_group < in_space.next_rung_group[None, :])


def offsets_on_copies(values: Tensor | None, space: ChannelSpace, copies: str) -> Tensor | None:
    """Per-channel offsets (bias, BN shift, running mean) over the copies.

    ``"sum"``: on primaries only (copies add up to one value); ``"latest"``: on every copy (each
    copy is a whole value).
    """
    if values is None:
        return None
    values = values.detach()[space.source]
    if copies == "latest":
        return values
    return values * (space.rung == 0).to(values.device, values.dtype)


def channel_view(module: nn.Module, index: slice | Tensor, copy_values: bool = False) -> nn.Module:
    """A shallow copy of a per-channel module (BN, BN + activation, ...) restricted to channels ``index``.

    Every direct parameter and buffer (1-D per channel; 0-d ones such as ``num_batches_tracked``
    stay shared) is indexed. With a slice and ``copy_values=False`` they are views: gradients and
    running-statistic updates reach the original module. ``copy_values=True`` gives new leaf
    parameters (export). Children (parameter-free activations) are shared.
    """
    if not module._parameters and not module._buffers and not hasattr(module, "num_features"):
        return module  # nothing per channel to restrict (an identity, a parameter-free activation)
    view = copy.copy(module)

    def take(tensor: Tensor | None) -> Tensor | None:
        if tensor is None or tensor.dim() == 0:
            return tensor
        return tensor[index].detach().clone() if copy_values else tensor[index]

    view._parameters = {
        name: nn.Parameter(take(p), p.requires_grad) if copy_values and p is not None else take(p)
        for name, p in module._parameters.items()
    }
    view._buffers = {name: take(b) for name, b in module._buffers.items()}
    if hasattr(module, "num_features"):
        view.num_features = len(range(module.num_features)[index]) if isinstance(index, slice) else len(index)
    return view


# BN's additive per-channel tensors: with "sum" copies they go on the primary copy only.
_BATCH_NORM_OFFSETS = ("bias", "running_mean")


@torch.no_grad()
def inflate_channel_module(module: nn.Module, space: ChannelSpace, copies: str) -> nn.Module:
    """A per-channel module over the space's channels: every copy gets its channel's parameters.

    ``"sum"`` copies: scale on every copy, shift (BN's β and mean, the tensor of a per-channel shift) on
    primaries only, so in eval mode ``Σ copies BN'(x̃) = BN(Σ copies x̃)``; only BN and the per-channel
    scales and shifts a block's forward reads itself (a ``sum_offsets`` attribute naming the shifts:
    :class:`~rdn.surgery.graph.ChannelTensorOp`) say which tensor is which. ``"latest"``: every copy is
    its channel's module.
    """
    is_batch_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
    offsets = _BATCH_NORM_OFFSETS if is_batch_norm else getattr(module, "sum_offsets", None)
    if copies == "sum" and offsets is None:
        raise ValueError(
            f"{type(module).__name__} has per-channel parameters whose role (scale or offset) surgery cannot "
            "tell; with copies='sum' only BatchNorm layers and per-channel scales and shifts are supported, use "
            "copies='latest'"
        )
    inflated = channel_view(module, space.source.to(_device_of(module)), copy_values=True)
    if copies == "sum":
        for name in offsets:
            tensors = inflated._parameters if name in inflated._parameters else inflated._buffers
            if tensors.get(name) is not None and tensors[name].dim():
                tensors[name].copy_(offsets_on_copies(getattr(module, name), space, copies))
    return inflated


@torch.no_grad()
def inflate_grouped_conv(conv: nn.Conv2d, in_space: ChannelSpace, out_space: ChannelSpace, copies: str) -> nn.Conv2d:
    """A grouped / depthwise conv over the spaces: each copy of a conv group gets that group's filters."""
    in_per_group = conv.in_channels // conv.groups
    out_per_group = conv.out_channels // conv.groups
    conv_groups = in_space.source[::in_per_group] // in_per_group  # base conv group of each new group
    weight = conv.weight.view(conv.groups, out_per_group, *conv.weight.shape[1:])[conv_groups]
    inflated = nn.Conv2d(
        len(in_space),
        len(out_space),
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        groups=len(conv_groups),
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    inflated.weight.copy_(weight.reshape(inflated.weight.shape))
    if conv.bias is not None:
        inflated.bias.copy_(offsets_on_copies(conv.bias, out_space, copies))
    inflated.train(conv.training)
    return inflated


def alignment_weight(space: ChannelSpace, s: int, dtype: torch.dtype, copies: str) -> Tensor:
    """(channels, offsets[s]) 0/1 map of the feature prefix of N_s onto the base features.

    ``"sum"``: adds the copies of each base channel; ``"latest"``: takes its last copy in the prefix.
    """
    columns = torch.arange(space.offsets[s])
    if copies == "latest":
        columns = columns[space.next_rung_group[columns] >= s]
    weight = torch.zeros(space.channels, space.offsets[s], dtype=dtype)
    weight[space.source[columns], columns] = 1.0
    return weight


def _device_of(module: nn.Module) -> torch.device:
    tensors = [*module.parameters(), *module.buffers()]
    return tensors[0].device if tensors else torch.device("cpu")


def _dtype_of(module: nn.Module) -> torch.dtype:
    floats = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    return floats[0].dtype if floats else torch.get_default_dtype()
