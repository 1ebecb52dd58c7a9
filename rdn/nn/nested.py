"""Nested (block-lower-triangular) layers: :class:`NestedConv2d` and :class:`NestedLinear`.

Both wrap the ops of :mod:`rdn_kernels` in an ``nn.Module`` whose parameters are stored
dense-shaped like ``nn.Conv2d`` / ``nn.Linear``: ``weight`` (D, C, kh, kw) or (D, C) and
``bias`` (D,). The block structure (``in_splits``, ``out_splits``, ``block_mask``) says which
blocks are used; see ``DESIGN.md`` §2.

Blocks outside the mask hold zeros. They stay zero under training without any hook: the kernels
never read them and give them exactly zero gradient, so SGD (with momentum and weight decay, both
proportional to the entry or to its past gradients) never moves them.

``block_mask`` is a registered bool buffer, so it travels with ``state_dict``; the splits are
constructor arguments (they fix the parameter shapes, like ``in_channels`` of ``nn.Conv2d``).

Bad arguments are refused when the layer is built (a TypeError / ValueError naming the argument),
not on its first forward; a saved mask is checked before anything is loaded. ``torch.jit.trace``
records stock torch ops (see :meth:`_NestedLayer._traced_forward`); ``torch.jit.script`` is refused.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdn_kernels import check_stages, make_layout, nested_conv2d, nested_linear
from rdn_kernels.backends import KNOWN_BACKENDS
from rdn_kernels.layout import NestedLayout
from rdn_kernels.nested_conv.geometry import ConvGeometry, int_pair

__all__ = ["NestedConv2d", "NestedLinear", "split_channels"]

_Layer = TypeVar("_Layer", bound="_NestedLayer")


def split_channels(channels: int, k: int) -> tuple[int, ...]:
    """Split ``channels`` into ``k`` ordered groups of near-equal size.

    The remainder ``channels % k`` goes to the first groups, one extra channel each, so earlier
    (smaller) sub-networks are never narrower than later groups: ``split_channels(10, 4)`` is
    ``(3, 3, 2, 2)``.

    Zero-size groups are not produced: ``k`` must satisfy ``1 <= k <= channels`` (the kernels
    accept zero-size groups, but a layer whose channels cannot fill every group is an error when
    building a network).
    """
    for name, value in (("channels", channels), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if not 1 <= k <= channels:
        raise ValueError(f"k must satisfy 1 <= k <= channels={channels} (no empty groups), got k={k}")
    base, extra = divmod(channels, k)
    return tuple(base + 1 if group < extra else base for group in range(k))


class _NestedLayer(nn.Module):
    """What NestedConv2d and NestedLinear share: splits, the mask buffer, init, export slicing.

    Subclasses set their own attributes (geometry), then call :meth:`_init_layer`.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    block_mask: Tensor
    _export_method: str  # the method returning the stock torch layer of the first s groups

    def _init_layer(
        self, in_splits, out_splits, block_mask, kernel_size: tuple[int, ...], bias: bool, backend: str, device, dtype
    ) -> None:
        """Create ``weight`` (D, C, *kernel_size), ``bias`` (D,) and the mask buffer, and initialise them."""
        # Every argument is checked before the (possibly large) parameters are allocated.
        self.backend = backend
        if not isinstance(bias, bool):
            # nn.Conv2d takes any truthy value; a tensor here is a mix-up with from_parameters.
            raise TypeError(
                f"bias must be a bool (whether to learn a bias), got {type(bias).__name__}; "
                "from_parameters builds a layer from existing weight and bias tensors"
            )
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating point torch.dtype (what the kernels compute in), got {dtype!r}")
        layout = make_layout(in_splits, out_splits, block_mask)
        for name, splits in (("in_splits", layout.in_splits), ("out_splits", layout.out_splits)):
            if sum(splits) == 0:
                # nn.Conv2d builds such a layer but cannot run it (no outputs) or returns an empty
                # output (no inputs), and the kernels' backward fails on it: refuse it here.
                raise ValueError(
                    f"{name} must have a positive sum (a nested layer needs at least one channel on each side), "
                    f"got {splits}"
                )
        factory = {"device": device, "dtype": dtype}
        shape = (sum(layout.out_splits), sum(layout.in_splits), *kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        self.bias = nn.Parameter(torch.empty(shape[0], **factory)) if bias else None
        self.in_splits: tuple[int, ...] = layout.in_splits
        self.out_splits: tuple[int, ...] = layout.out_splits
        self.register_buffer("block_mask", torch.tensor(layout.mask, dtype=torch.bool, device=self.weight.device))
        # A Python copy of the mask: the forward passes it to the op without reading a tensor,
        # which keeps torch.compile graphs free of data-dependent breaks.
        self._layout = layout
        self.reset_parameters()

    @property
    def backend(self) -> str:
        """Backend of :mod:`rdn_kernels` every forward uses: ``"auto"`` or a backend name."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if not isinstance(name, str) or (name != "auto" and name not in KNOWN_BACKENDS):
            raise ValueError(f"backend must be 'auto' or one of {list(KNOWN_BACKENDS)}, got {name!r}")
        self._backend = name

    @property
    def layout(self) -> NestedLayout:
        return self._layout

    @property
    def num_groups(self) -> int:
        return len(self.in_splits)

    @property
    def in_channels(self) -> int:
        return sum(self.in_splits)

    @property
    def out_channels(self) -> int:
        return sum(self.out_splits)

    def weight_mask(self) -> Tensor:
        """(D, C) bool: true where the weight is used (the block mask expanded to channels)."""
        rows = torch.tensor(self.out_splits, device=self.block_mask.device)
        cols = torch.tensor(self.in_splits, device=self.block_mask.device)
        return self.block_mask.repeat_interleave(rows, dim=0).repeat_interleave(cols, dim=1)

    def _masked_weight(self) -> Tensor:
        mask = self.weight_mask().view(*self.weight.shape[:2], *(1,) * (self.weight.dim() - 2))
        return self.weight.masked_fill(~mask, 0.0)

    @torch.no_grad()
    def set_block_mask(self, block_mask) -> None:
        """Use only the blocks of ``block_mask`` ((K, K) lower-triangular bool) from now on.

        Weights of blocks leaving the mask are zeroed (they stay zero under training, see the
        module docstring); blocks entering it start from their stored (zero) weights.
        """
        layout = make_layout(self.in_splits, self.out_splits, block_mask)
        self.block_mask.copy_(torch.tensor(layout.mask, dtype=torch.bool))
        self._layout = layout
        self.weight.copy_(self._masked_weight())

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise like the dense torch layer (on the dense shape), then zero unused blocks."""
        # Same distributions as nn.Conv2d / nn.Linear.reset_parameters.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)
        self.weight.copy_(self._masked_weight())

    @classmethod
    def from_parameters(
        cls: type[_Layer],
        weight: Tensor,
        bias: Tensor | None,
        in_splits: Sequence[int],
        out_splits: Sequence[int],
        block_mask=None,
        backend: str = "auto",
        **geometry,
    ) -> _Layer:
        """A nested layer holding dense-shaped ``weight`` (D, C, ...) and ``bias`` (D,) or None.

        Blocks outside the mask are zeroed. ``geometry`` are the remaining constructor arguments:
        ``kernel_size`` (and ``stride``, ``padding``, ``dilation``) for :class:`NestedConv2d`,
        none for :class:`NestedLinear`. The layer is created on ``weight``'s device and dtype.
        """
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must have a floating dtype, got {weight.dtype}")
        if bias is not None and not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        nested = cls(
            in_splits,
            out_splits,
            bias=bias is not None,
            block_mask=block_mask,
            backend=backend,
            device=weight.device,
            dtype=weight.dtype,
            **geometry,
        )
        if weight.shape != nested.weight.shape:
            expected = tuple(nested.weight.shape)
            raise ValueError(f"weight must have shape {expected} (the splits and geometry), got {tuple(weight.shape)}")
        if bias is not None and bias.shape != nested.bias.shape:
            raise ValueError(f"bias must have shape {tuple(nested.bias.shape)}, got {tuple(bias.shape)}")
        _copy_parameters(nested, weight, bias)
        with torch.no_grad():
            nested.weight.copy_(nested._masked_weight())
        return nested

    def _check_subnet(self, s: int) -> None:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"s (number of leading groups to export) must be an int, got {s!r}")
        if not 1 <= s <= self.num_groups:
            raise ValueError(f"s must satisfy 1 <= s <= K={self.num_groups}, got {s}")

    def _exported_parameters(self, s: int) -> tuple[Tensor, Tensor | None]:
        """Weight (D_s, C_s, ...) and bias (D_s,) of the first ``s`` groups, unused blocks zero."""
        self._check_subnet(s)
        out_channels = self.layout.out_offsets[s]
        in_channels = self.layout.in_offsets[s]
        weight = self._masked_weight()[:out_channels, :in_channels].detach().clone()
        bias = None if self.bias is None else self.bias[:out_channels].detach().clone()
        return weight, bias

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "block_mask"
        if key in state_dict:
            # Checked before the parent copies anything (weights included): a refused mask leaves
            # this layer as it was, and its own state_dict loadable.
            self._check_saved_mask(key, state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # The buffer now holds the saved mask (checked above) or, where torch refused the entry
        # (size mismatch), the old one: refresh the Python copy from it.
        self._layout = make_layout(self.in_splits, self.out_splits, self.block_mask.cpu())

    def _check_saved_mask(self, key: str, mask: Any) -> None:
        """Raise unless ``mask`` is a (K, K) lower-triangular bool tensor for this layer's splits."""
        if not isinstance(mask, Tensor):
            raise TypeError(f"state_dict entry {key!r} must be a bool tensor (K, K), got {type(mask).__name__}")
        try:
            make_layout(self.in_splits, self.out_splits, mask.cpu())
        except (TypeError, ValueError) as error:
            raise type(error)(
                f"state_dict entry {key!r} is not a mask for this layer (in_splits={self.in_splits}, "
                f"out_splits={self.out_splits}): {error}"
            ) from error

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this on every submodule first: refuse here, by name, rather than
        # with an obscure failure deep in the compiler (the forward calls Python-registered ops).
        raise TypeError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script (its forward calls Python-registered "
            f"ops). Use torch.jit.trace, which records stock torch ops for nested layers, or export to stock "
            f"modules: {self._export_method}(s) for this layer, RussianDollNet.export(s) for a whole network."
        )

    def _traced_forward(self, x: Tensor, stages: tuple[int, int] | None, out: Tensor | None) -> Tensor:
        """The forward in stock torch ops, for ``torch.jit.trace``: one dense op on the masked weight.

        The tracer cannot record the rdn_kernels op (its mask argument is a list of bools), and a
        trace of stock ops also runs where that op is not registered (C++, another process).
        Blocks outside the mask are multiplied as zeros, as in ``export_conv`` / ``export_linear``.
        """
        with warnings.catch_warnings():
            # The tracer warns that it fixes the values read here (input and out shapes, the
            # splits as tensors): they are the layer's channel counts, constants by design.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            lo, hi = check_stages(stages, self.num_groups)
            start, stop = self.layout.out_offsets[lo], self.layout.out_offsets[hi]
            prefix = self.layout.in_offsets[hi]
            shape = tuple(int(size) for size in x.shape)
            if len(shape) != self.weight.dim() or shape[1] not in (self.in_channels, prefix):
                raise ValueError(
                    f"input must be {self.weight.dim()}-D with C = {self.in_channels} channels"
                    + (f" or the prefix {prefix} read by stages < {hi}" if prefix != self.in_channels else "")
                    + f", got shape {shape}"
                )
            weight = self._masked_weight()[start:stop, :prefix]
            bias = None if self.bias is None else self.bias[start:stop]
            result = self._dense_forward(x[:, :prefix], weight, bias)
            if out is None:
                return result
            expected = (shape[0], self.out_channels, *(int(size) for size in result.shape[2:]))
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"out must be a torch.Tensor of the full output shape {expected}, got {type(out).__name__}"
                )
            got = tuple(int(size) for size in out.shape)
            if got != expected:
                raise ValueError(f"out must have the full output shape {expected}, got {got}")
            out.narrow(1, start, stop - start).copy_(result)
            return out

    def _dense_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The stock torch layer's functional (F.conv2d / F.linear) with this layer's geometry."""
        raise NotImplementedError

    def _structure_repr(self) -> str:
        text = f"in_splits={self.in_splits}, out_splits={self.out_splits}"
        if self.layout != make_layout(self.in_splits, self.out_splits):
            text += f", block_mask={[[int(m) for m in row] for row in self.layout.mask]}"
        return text


def _check_source(name: str, module: Any, expected: type[nn.Module]) -> None:
    """``module`` is an initialised ``nn.<expected>``: a lazy one has no channels or weight yet."""
    if not isinstance(module, expected):
        raise TypeError(f"{name} must be an nn.{expected.__name__}, got {type(module).__name__}")
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"{name} is an uninitialized lazy {type(module).__name__}: run a forward through it first, "
            "so that its channels and weight exist"
        )


@torch.no_grad()
def _copy_parameters(layer: nn.Module, weight: Tensor, bias: Tensor | None) -> None:
    """Copy ``weight`` and ``bias`` (when not None) into ``layer``'s parameters of the same shapes."""
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)


def _check_splits_match(in_splits: Any, out_splits: Any, block_mask: Any, source: nn.Module, what: str) -> None:
    """Valid splits and mask whose splits sum to ``source``'s ``in_<what>`` / ``out_<what>``."""
    layout = make_layout(in_splits, out_splits, block_mask)  # a bad sequence is refused by name first
    for side, splits in (("in", layout.in_splits), ("out", layout.out_splits)):
        channels = getattr(source, f"{side}_{what}")
        if sum(splits) != channels:
            raise ValueError(
                f"{side}_splits must sum to the layer's {side}_{what} = {channels}, got {splits} (sum {sum(splits)})"
            )


def _explicit_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """nn.Conv2d's padding as ints; the strings 'valid' / 'same' are converted when symmetric."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        padding = []
        for kernel, dilation in zip(conv.kernel_size, conv.dilation, strict=True):
            total = dilation * (kernel - 1)
            if total % 2:
                raise ValueError(
                    f"conv has padding='same' with kernel {conv.kernel_size} and dilation {conv.dilation}, "
                    "which pads asymmetrically; nested convs need symmetric integer padding"
                )
            padding.append(total // 2)
        return (padding[0], padding[1])
    return (int(conv.padding[0]), int(conv.padding[1]))


class NestedConv2d(_NestedLayer):
    """Block-lower-triangular ``nn.Conv2d`` (groups = 1) over :func:`rdn_kernels.nested_conv2d`.

    Args:
        in_splits, out_splits: K group sizes of the C input and D output channels.
        kernel_size, stride, padding, dilation: as ``nn.Conv2d`` (ints or pairs; no strings).
        bias: whether to learn a bias (D,).
        block_mask: (K, K) lower-triangular bool; default all i <= j.
        backend: ``"auto"``, ``"torch"``, ``"cpp"``, ``"triton"`` or ``"cuda"``; settable later.

    Shapes: input (N, C, H, W) → output (N, D, H_out, W_out); with ``stages=(lo, hi)`` only output
    groups lo..hi-1 are computed and the input may be just the first ``sum(in_splits[:hi])``
    channels.
    """

    _export_method = "export_conv"

    def __init__(
        self,
        in_splits: Sequence[int],
        out_splits: Sequence[int],
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        block_mask=None,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        # The op reads the kernel from the weight's shape: the layer checks the size it allocates.
        self.kernel_size: tuple[int, int] = int_pair("kernel_size", kernel_size, 1)
        # The op's own check of the rest, run now rather than at the first forward.
        geometry = ConvGeometry.from_args(stride, padding, dilation)
        self.stride: tuple[int, int] = geometry.stride
        self.padding: tuple[int, int] = geometry.padding
        self.dilation: tuple[int, int] = geometry.dilation
        self._init_layer(in_splits, out_splits, block_mask, self.kernel_size, bias, backend, device, dtype)

    def forward(self, x: Tensor, stages: tuple[int, int] | None = None, out: Tensor | None = None) -> Tensor:
        """(N, C, H, W) → (N, sum(out_splits[lo:hi]), H_out, W_out), or ``out`` with those groups written."""
        if torch.jit.is_tracing():
            return self._traced_forward(x, stages, out)
        return nested_conv2d(
            x,
            self.weight,
            self.bias,
            in_splits=self.in_splits,
            out_splits=self.out_splits,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            block_mask=self.layout.mask,
            stages=stages,
            out=out,
            backend=self.backend,
        )

    def _dense_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        in_splits: Sequence[int],
        out_splits: Sequence[int],
        block_mask=None,
        backend: str = "auto",
    ) -> NestedConv2d:
        """A nested conv with ``conv``'s geometry, weight and bias (blocks outside the mask zeroed).

        ``conv`` must be a plain convolution: groups = 1 and zero padding.
        """
        _check_source("conv", conv, nn.Conv2d)
        if conv.groups != 1:
            raise ValueError(
                f"conv has groups={conv.groups}; only plain convolutions (groups=1) can be nested — "
                "depthwise and grouped convs act per channel group and stay as they are"
            )
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv has padding_mode={conv.padding_mode!r}; nested convs support 'zeros' only")
        _check_splits_match(in_splits, out_splits, block_mask, conv, "channels")
        return cls.from_parameters(
            conv.weight,
            conv.bias,
            in_splits,
            out_splits,
            block_mask,
            backend,
            kernel_size=conv.kernel_size,
            stride=conv.stride,
            padding=_explicit_padding(conv),
            dilation=conv.dilation,
        )

    def export_conv(self, s: int) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` computing output groups 0..s-1 from input groups 0..s-1.

        Its weight is this layer's weight sliced to (sum(out_splits[:s]), sum(in_splits[:s]), kh, kw)
        with the blocks outside the mask zero; no custom op is involved.
        """
        weight, bias = self._exported_parameters(s)
        conv = nn.Conv2d(
            weight.shape[1],
            weight.shape[0],
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        _copy_parameters(conv, weight, bias)
        return conv

    def extra_repr(self) -> str:
        text = f"{self._structure_repr()}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.bias is None:
            text += ", bias=False"
        return text + f", backend={self.backend!r}"


class NestedLinear(_NestedLayer):
    """Block-lower-triangular ``nn.Linear`` over :func:`rdn_kernels.nested_linear`.

    Shapes: input (N, C) → output (N, D); ``stages``/``out`` as in :class:`NestedConv2d`.
    """

    _export_method = "export_linear"

    def __init__(
        self,
        in_splits: Sequence[int],
        out_splits: Sequence[int],
        bias: bool = True,
        block_mask=None,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self._init_layer(in_splits, out_splits, block_mask, (), bias, backend, device, dtype)

    @property
    def in_features(self) -> int:
        return self.in_channels

    @property
    def out_features(self) -> int:
        return self.out_channels

    def forward(self, x: Tensor, stages: tuple[int, int] | None = None, out: Tensor | None = None) -> Tensor:
        """(N, C) → (N, sum(out_splits[lo:hi])), or ``out`` (N, D) with those groups written."""
        if torch.jit.is_tracing():
            return self._traced_forward(x, stages, out)
        return nested_linear(
            x,
            self.weight,
            self.bias,
            in_splits=self.in_splits,
            out_splits=self.out_splits,
            block_mask=self.layout.mask,
            stages=stages,
            out=out,
            backend=self.backend,
        )

    def _dense_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        in_splits: Sequence[int],
        out_splits: Sequence[int],
        block_mask=None,
        backend: str = "auto",
    ) -> NestedLinear:
        """A nested linear layer with ``linear``'s weight and bias (blocks outside the mask zeroed)."""
        _check_source("linear", linear, nn.Linear)
        _check_splits_match(in_splits, out_splits, block_mask, linear, "features")
        return cls.from_parameters(linear.weight, linear.bias, in_splits, out_splits, block_mask, backend)

    def export_linear(self, s: int) -> nn.Linear:
        """A plain ``nn.Linear`` computing output groups 0..s-1 from input groups 0..s-1."""
        weight, bias = self._exported_parameters(s)
        linear = nn.Linear(
            weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
        )
        _copy_parameters(linear, weight, bias)
        return linear

    def extra_repr(self) -> str:
        text = self._structure_repr()
        if self.bias is None:
            text += ", bias=False"
        return text + f", backend={self.backend!r}"
