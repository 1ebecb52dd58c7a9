"""``GroupedNorm``: a normalisation over channels made nesting-safe by taking its statistics per channel group.

LayerNorm over the channels (ConvNeXt's ``LayerNorm2d``, a LayerNorm of pooled features) and
GroupNorm couple channels: every output depends on the mean and variance of all of them, so a
sub-network holding only the first groups cannot compute its part, and adding a group would change
the earlier ones. ``GroupedNorm`` normalises every channel group (the nesting groups, ``splits``)
by its own statistics, so a group's output depends on that group only; the affine parameters stay
per channel. With one group it is the base normalisation. This is not the base model's function:
the network needs fine-tuning after the change (the paper leaves such layers un-nested).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GroupedNorm"]


class GroupedNorm(nn.Module):
    """Normalisation of (N, C, ...) tensors with statistics per channel group.

    Args:
        splits: channels per group (zeros allowed), summing to C.
        spatial: False: LayerNorm over the channels at every position (statistics over the group's
            channels); True: GroupNorm (statistics over the group's channels and all positions).
        eps: added to the variance.
        weight, bias: per-channel affine parameters (C,), or None for none.
        norm_groups: (C,) the base GroupNorm's group of every channel: statistics are then taken per
            (nesting group, base group) pair, so a nesting group holding every channel computes the
            base GroupNorm exactly. None: one base group.
    """

    def __init__(
        self,
        splits: Sequence[int],
        spatial: bool,
        eps: float = 1e-5,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        norm_groups: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.splits = tuple(int(size) for size in splits)
        if any(size < 0 for size in self.splits):
            raise ValueError(f"splits must be non-negative channel counts, got {self.splits}")
        self.offsets = (0, *accumulate(self.splits))
        self.spatial, self.eps = bool(spatial), float(eps)
        channels = self.offsets[-1]
        for name, value in (("weight", weight), ("bias", bias)):
            if value is not None and tuple(value.shape) != (channels,):
                raise ValueError(f"{name} must have shape ({channels},), got {tuple(value.shape)}")
        self.weight = None if weight is None else nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        if norm_groups is not None and tuple(norm_groups.shape) != (channels,):
            raise ValueError(f"norm_groups must have shape ({channels},), got {tuple(norm_groups.shape)}")
        # one-hot (c, g) maps of the base groups within every nesting group; None where there is one
        self._maps: list[Tensor | None] = []
        for g in range(len(self.splits)):
            ids = None if norm_groups is None else norm_groups[self.offsets[g] : self.offsets[g + 1]]
            if ids is None or ids.numel() == 0 or bool((ids == ids[0]).all()):
                self._maps.append(None)
            else:
                self._maps.append(F.one_hot(torch.unique(ids, return_inverse=True)[1]).float())
        self.norm_groups = None if norm_groups is None else norm_groups.detach().clone()

    @property
    def num_groups(self) -> int:
        return len(self.splits)

    def extra_repr(self) -> str:
        kind = "group norm" if self.spatial else "layer norm over channels"
        return f"splits={self.splits}, {kind}, eps={self.eps}, affine={self.weight is not None}"

    def _groups_of(self, channels: int) -> tuple[int, int]:
        """(0, hi): the groups a prefix of ``channels`` channels holds."""
        for hi in range(self.num_groups + 1):
            if self.offsets[hi] == channels:
                return 0, hi
        raise ValueError(f"input has {channels} channels, which is no prefix of groups {self.splits}")

    def forward(self, x: Tensor, groups: tuple[int, int] | None = None) -> Tensor:
        """Groups ``lo..hi-1`` (``groups``) of the output from ``x`` holding those groups' channels;
        ``groups=None``: ``x`` is a prefix of whole groups (all of them, or the first few)."""
        lo, hi = self._groups_of(x.shape[1]) if groups is None else groups
        base = self.offsets[lo]
        if x.shape[1] != self.offsets[hi] - base:
            raise ValueError(f"groups {lo}..{hi - 1} hold {self.offsets[hi] - base} channels, x has {x.shape[1]}")
        pieces = []
        for g in range(lo, hi):
            start, stop = self.offsets[g], self.offsets[g + 1]
            if start == stop:
                continue
            piece = x[:, start - base : stop - base]
            weight = None if self.weight is None else self.weight[start:stop]
            bias = None if self.bias is None else self.bias[start:stop]
            if self._maps[g] is not None:
                pieces.append(self._mixed(piece, self._maps[g], weight, bias))
            elif self.spatial:
                pieces.append(F.group_norm(piece, 1, weight, bias, self.eps))
            else:
                moved = piece.movedim(1, -1)
                pieces.append(F.layer_norm(moved, (stop - start,), weight, bias, self.eps).movedim(-1, 1))
        if not pieces:
            return x[:, :0]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)

    def _mixed(self, x: Tensor, members: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """Normalise ``x`` (N, c, ...) with statistics per base group (``members``: (c, g) one-hot)."""
        members = members.to(x.device, x.dtype)
        # statistics over the channels of each base group (and over the positions when spatial)
        flat = x.flatten(2) if x.dim() > 2 else x.unsqueeze(-1)  # (N, c, P)
        count = members.sum(0)[None, :, None]  # (1, g, 1)
        if self.spatial:
            count = count * flat.shape[-1]
        reduce = (lambda t: t.sum(-1, keepdim=True)) if self.spatial else (lambda t: t)  # noqa: E731
        mean = reduce(torch.einsum("ncp,cg->ngp", flat, members)) / count
        centred = flat - torch.einsum("ngp,cg->ncp", mean, members)
        variance = reduce(torch.einsum("ncp,cg->ngp", centred.square(), members)) / count
        out = centred * torch.einsum("ngp,cg->ncp", (variance + self.eps).rsqrt(), members)
        out = out.view(x.shape)
        shape = (1, -1, *(1,) * (x.dim() - 2))
        if weight is not None:
            out = out * weight.view(shape)
        if bias is not None:
            out = out + bias.view(shape)
        return out

    def prefix(self, groups: int) -> GroupedNorm:
        """The first ``groups`` groups as a module of their own (a sub-network's export)."""
        stop = self.offsets[groups]
        take = lambda value: None if value is None else value.detach()[:stop]  # noqa: E731
        module = GroupedNorm(self.splits[:groups], self.spatial, self.eps, take(self.weight), take(self.bias),
                             take(self.norm_groups))  # fmt: skip
        return module.train(self.training)
