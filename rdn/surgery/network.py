"""``RussianDollNet``: K nested sub-networks N_1 ⊂ ... ⊂ N_K built from one base model.

The RDN runs the base model's dataflow graph (traced by :mod:`rdn.surgery.graph`) node by node
over *channel prefixes*: sub-network N_s computes the channels of groups 0..s-1 of every tensor
(``offsets[s]`` channels of its space) and nothing else. Nested layers get ``stages=(0, s)``;
BN, grouped / depthwise convs and channel-wise ops get the matching channel slice of their
parameters; un-nested (single-group) tensors are computed in full by N_1.

Three ways to run it:

- ``forward(x)``: one pass of N_K; every sub-network's features are a prefix of N_K's, so the K
  heads give the K logits from that single pass (what joint training uses);
- ``forward(x, subnet=s)``: N_s alone;
- ``start(x)`` / ``step(state)``: N_1, then N_2, ... computing only the new group of every tensor
  (``stages=(s, s+1)`` for nested layers, which read the cached full-width buffers of their inputs;
  channel-wise steps read only the new groups of theirs). Only what a later stage reads is cached:
  nested-layer inputs and the heads' inputs; ``state.index_select(kept)`` drops the samples that
  exited, copying only that cache.

Every path frees an intermediate after its last reader, as an eager forward does.

Depth split (``nest(..., depth_split=...)``): the steps up to the split block form the shallow
part; every width s gets a second exit there (a light alignment block into the shared
classifier), so there are 2K sub-networks ("exits"). Every method indexes sub-networks by their
exit number e = 1..``num_subnets``; :attr:`RussianDollNet.exits` maps it to (width s, depth),
in the order (1, 0), (1, 1), (2, 0), ... that ``forward(x)`` and ``step`` follow (without a split,
exit e is N_e at full depth). N_{s,0}'s features are never updated by N_{s,1}, which reads them.

Costs (:meth:`macs`, :meth:`params`, :meth:`peak_activation_bytes`) are per sample at the
calibration input size and count only what the exit computes (its blocks, slices and head).

Heads (DESIGN.md §4.5): sub-network s pools its own feature prefix (F_s channels) and maps it with
an alignment ``nn.Linear(F_s, F, bias=False)`` to the base feature width F; the last layer, the base
classifier, is shared by all heads. The alignment starts as the 0/1 matrix summing the copies of
each base feature channel (``copies="sum"``) or picking its latest copy (``"latest"``), so N_K's
head starts as exactly the base classifier on its features. Both layers are linear, so the RDN
applies them folded (:class:`ExitAlignment`) and counts a head's MACs as F_s·C.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from rdn.nn import NestedConv2d, NestedLinear
from rdn.surgery.graph import SurgeryGraph, call_node
from rdn.surgery.record import NestRecord
from rdn.surgery.spaces import (
    ChannelSpace,
    alignment_weight,
    channel_view,
    inflate_channel_module,
    inflate_grouped_conv,
    nested_parameters,
)

__all__ = ["ExitAlignment", "RussianDollNet", "StagedState"]


@dataclass
class _Step:
    """One node of the graph as the RDN runs it."""

    node: fx.Node
    role: str  # input, meta, fixed, nested, grouped, channel_params, channelwise, classifier, output
    space: ChannelSpace | None  # of the output (None: not a channel tensor)
    shape: tuple[int, ...] | None  # output shape at the calibration batch (batch dim included)
    itemsize: int
    inputs: list[str]  # channel-carrying inputs

    @property
    def name(self) -> str:
        return self.node.name


@dataclass
class StagedState:
    """What :meth:`RussianDollNet.step` needs to go from one exit to the next.

    Attributes:
        subnet: the exit computed so far (1-based, :attr:`RussianDollNet.exits` order).
        widths: groups computed so far in each depth region (shallow part, rest).
        logits: (N, num_classes) of that exit.
        values: only what a later stage reads: the input of every nested layer and the tensors
            the heads read (after ``start`` their prefixes; from the first step on, full-width
            (N, C, ...) buffers whose first groups are valid, channels of groups not computed yet
            uninitialised), plus the un-nested tensors and values that
            later stages read (as computed). Every other intermediate is recomputed group by group.
    """

    subnet: int
    widths: list[int]
    logits: Tensor
    values: dict[str, Any]

    def index_select(self, index: Tensor) -> StagedState:
        """The state of the samples ``index`` only (samples that did not exit yet)."""
        batch = self.logits.shape[0]

        def select(value):
            if isinstance(value, Tensor) and value.dim() and value.shape[0] == batch:
                return value.index_select(0, index)
            return value

        values = {name: select(value) for name, value in self.values.items()}
        return StagedState(self.subnet, list(self.widths), self.logits.index_select(0, index), values)


def grouped_conv_channels(conv: nn.Conv2d, x: Tensor, start: int, stop: int) -> Tensor:
    """Output channels ``start:stop`` of a grouped conv whose input slice ``x`` holds their groups."""
    out_per_group = conv.out_channels // conv.groups
    return F.conv2d(
        x,
        conv.weight[start:stop],
        None if conv.bias is None else conv.bias[start:stop],
        conv.stride,
        conv.padding,
        conv.dilation,
        (stop - start) // out_per_group,
    )


def _conv_like_macs(module: nn.Module, shape: tuple[int, ...]) -> int:
    """MACs per sample of a stock conv / linear layer producing ``shape`` (batch first)."""
    if isinstance(module, nn.Conv2d):
        return (
            module.out_channels
            * module.in_channels
            // module.groups
            * math.prod(module.kernel_size)
            * math.prod(shape[2:])
        )
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features * math.prod(shape[2:])
    return 0


class ExitAlignment(nn.Linear):
    """Alignment of a full-depth exit's head: ``nn.Linear(F_s, F, bias=False)``, then the shared classifier.

    ``forward(features)`` is the plain linear map (N, F_s) → (N, F) (exports use it);
    ``forward(features, classifier)`` gives the logits (N, C). Both maps are linear, so the logits
    are computed with their product W_classifier·A_s (C, F_s) whenever that is cheaper: F_s·C MACs
    per sample instead of F_s·F (F = 1280 against C = 10 classes for MobileNetV2). Without
    gradients (inference) the product is computed once per weight version and reused; with
    gradients it is formed per call when the batch is larger than C (the same function and
    gradients, up to rounding).
    """

    def forward(self, features: Tensor, classifier: nn.Linear | None = None) -> Tensor:
        if classifier is None:
            return super().forward(features)
        needs_grad = torch.is_grad_enabled() and (self.weight.requires_grad or classifier.weight.requires_grad)
        if needs_grad and features.shape[0] <= classifier.out_features:
            return classifier(super().forward(features))
        folded = classifier.weight @ self.weight if needs_grad else self._cached_product(classifier.weight)
        return F.linear(features, folded, classifier.bias)

    def _cached_product(self, classifier_weight: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return classifier_weight @ self.weight
        key = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in (self.weight, classifier_weight))
        cached = getattr(self, "_product", None)
        if cached is None or cached[0] != key:
            cached = (key, classifier_weight @ self.weight)
            self._product = cached
        return cached[1]

    @torch.no_grad()
    def folded(self, classifier: nn.Linear) -> nn.Linear:
        """A new ``nn.Linear(F_s, C)``: this alignment followed by ``classifier``, as one layer."""
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        layer = nn.Linear(self.in_features, classifier.out_features, bias=classifier.bias is not None, **factory)
        layer.weight.copy_(classifier.weight @ self.weight)
        if classifier.bias is not None:
            layer.bias.copy_(classifier.bias)
        return layer.train(self.training)

    def _apply(self, fn, recurse: bool = True):
        self.__dict__.pop("_product", None)  # converted weights (.to, .half, ...) may reuse the old addresses
        return super()._apply(fn, recurse)


class RussianDollNet(nn.Module):
    """K nested sub-networks of one base model (module docstring). Build it with :func:`rdn.surgery.nest`.

    Args:
        graph: the analysed base model.
        orders: unit order of every defined channel space (the selection's result).
        record: the options and findings that rebuild this structure (:attr:`record`).
    """

    def __init__(self, graph: SurgeryGraph, orders: dict[str, list[int]], record: NestRecord) -> None:
        super().__init__()
        self.record = record
        copies = record.config.copies
        self.num_groups = graph.num_groups
        self.layers = nn.ModuleDict()
        self._steps: list[_Step] = []
        for name, info in graph.infos.items():
            space = graph.space(info.space_key, orders) if info.space_key is not None else None
            role = info.role
            if role in ("nested", "grouped", "channel_params", "channelwise", "opaque") and space.is_single_group:
                role = "fixed"
            if role == "opaque":
                raise AssertionError(f"opaque node {name} outside the un-nested region")  # graph._pin forbids it
            in_space = graph.space(graph.space_of(info.inputs[0]), orders) if info.inputs else None
            if info.module is not None and role != "classifier":
                self.layers[name] = self._convert(info.node, info.module, role, in_space, space, copies)
            itemsize = info.dtype.itemsize if info.dtype is not None else 0
            self._steps.append(_Step(info.node, role, space, info.shape, itemsize, info.inputs))
        self._by_name = {step.name: step for step in self._steps}
        classifier = graph.infos[graph.classifier].module
        self._features = graph.classifier_input
        self._feature_space = graph.space(graph.space_of(self._features), orders)
        self.classifier = copy.deepcopy(classifier)
        self.heads = nn.ModuleList()
        for s in range(1, self.num_groups + 1):
            width = self._feature_space.offsets[s]
            head = ExitAlignment(
                width,
                classifier.in_features,
                bias=False,
                device=classifier.weight.device,
                dtype=classifier.weight.dtype,
            )
            with torch.no_grad():
                head.weight.copy_(alignment_weight(self._feature_space, s, classifier.weight.dtype, copies))
            self.heads.append(head)
        self._init_depth_split(graph, orders)
        self._plan_lifetimes()
        self.train(classifier.training)

    def _init_depth_split(self, graph: SurgeryGraph, orders: dict[str, list[int]]) -> None:
        """Shallow exits (DESIGN.md §4.4): after the split node, per width s a light alignment block.

        The block maps N_s's channels of the split tensor to the classifier's width: 1×1 conv →
        BN → ReLU → global average pool; the shared classifier follows. New layers, trained from scratch.
        """
        self.depth_heads = nn.ModuleList()
        names = [step.name for step in self._steps]
        if graph.depth_split is None:
            self._split = None
            self._regions = [(0, len(self._steps))]
            self.exits = [(s, 1) for s in range(1, self.num_groups + 1)]
            return
        self._split = graph.depth_split
        split_index = names.index(self._split) + 1
        self._regions = [(0, split_index), (split_index, len(self._steps))]
        self.exits = [(s, depth) for s in range(1, self.num_groups + 1) for depth in (0, 1)]
        split_space = self._by_name[self._split].space
        width = self.classifier.in_features
        factory = {"device": self.classifier.weight.device, "dtype": self.classifier.weight.dtype}
        for s in range(1, self.num_groups + 1):
            channels = split_space.offsets[s] if not split_space.is_single_group else len(split_space)
            self.depth_heads.append(
                nn.Sequential(
                    nn.Conv2d(channels, width, 1, bias=False, **factory),
                    nn.BatchNorm2d(width, **factory),
                    nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1),
                    nn.Flatten(),
                )
            )

    @property
    def rdn_config(self) -> dict:
        """Read-only compatibility view of :attr:`record`: a new dict in the flat version-1 layout
        (``{"version": 1, "k", "mode", ..., "orders", "pruned_blocks", "ties"}``) on every access, so
        writing into it changes nothing. ``from_config`` takes it; new code reads :attr:`record`."""
        return self.record.to_legacy_dict()

    @property
    def num_subnets(self) -> int:
        """Number of sub-networks (exits): K, or 2K with a depth split (:attr:`exits` maps them)."""
        return len(self.exits)

    def nested_layers(self) -> dict[str, NestedConv2d | NestedLinear]:
        """The nested layers (graph node name → layer), in execution order."""
        return {step.name: self.layers[step.name] for step in self._steps if step.role == "nested"}

    def nested_spaces(self, name: str) -> tuple[ChannelSpace, ChannelSpace]:
        """(input space, output space) of nested layer ``name``: the channel copies it reads and writes."""
        step = self._by_name[name]
        return self._space_of(step.inputs[0]), step.space

    def layer_spaces(self) -> dict[str, ChannelSpace]:
        """The output channel space of every layer of :attr:`layers` that writes channels (graph node
        name → space; single-group for un-nested layers), in execution order. Channels of group q are
        ``space.offsets[q]:space.offsets[q + 1]`` of the layer's output and of its per-channel tensors."""
        return {step.name: step.space for step in self._steps if step.name in self.layers and step.space is not None}

    def base_module_name(self, name: str) -> str:
        """Qualified name, in the base model, of the module layer ``name`` (a key of :attr:`layers`) was made from."""
        if name not in self.layers:
            raise ValueError(f"name must be a layer of this RDN (a key of .layers: {list(self.layers)}), got {name!r}")
        return self._by_name[name].node.target

    @staticmethod
    def _convert(node: fx.Node, module: nn.Module, role: str, in_space, space, copies: str) -> nn.Module:
        if role == "nested":
            weight, bias, block_mask = nested_parameters(module.weight, module.bias, in_space, space, copies)
            if isinstance(module, nn.Linear):
                nested = NestedLinear.from_parameters(weight, bias, in_space.splits, space.splits, block_mask)
            else:
                if module.padding_mode != "zeros" or isinstance(module.padding, str):
                    raise ValueError(
                        f"conv {node.target} has padding {module.padding!r} / padding_mode {module.padding_mode!r}; "
                        "nested convs need integer zero padding"
                    )
                nested = NestedConv2d.from_parameters(
                    weight,
                    bias,
                    in_space.splits,
                    space.splits,
                    block_mask,
                    kernel_size=module.kernel_size,
                    stride=module.stride,
                    padding=module.padding,
                    dilation=module.dilation,
                )
            return nested.train(module.training)
        if role == "grouped":
            if module.padding_mode != "zeros":
                raise ValueError(f"grouped conv {node.target} has padding_mode {module.padding_mode!r}; only 'zeros'")
            return inflate_grouped_conv(module, in_space, space, copies)
        if role == "channel_params":
            return inflate_channel_module(module, space, copies)
        return copy.deepcopy(module)

    # ------------------------------------------------------------------------------------------
    # Running
    # ------------------------------------------------------------------------------------------

    def _exit(self, subnet, name: str = "subnet") -> tuple[int, int]:
        """(width s, depth) of exit number ``subnet`` (1-based)."""
        if isinstance(subnet, bool) or not isinstance(subnet, int):
            raise TypeError(f"{name} must be an int in 1..{self.num_subnets}, got {subnet!r}")
        if not 1 <= subnet <= self.num_subnets:
            raise ValueError(
                f"{name} must satisfy 1 <= {name} <= {self.num_subnets} (the number of exits), got {subnet}"
            )
        return self.exits[subnet - 1]

    def _plan_lifetimes(self) -> None:
        """Which values live how long: freed after their last reader, or cached across stages.

        A stage s → s+1 recomputes only the steps in ``_regrown`` (multi-group channel tensors, and
        the meta values they read) and only their new groups; the channel-wise ones read just the
        new groups of their inputs. So a stage reads from earlier ones only: the full input of every
        nested layer, what the heads read (features, split tensor), un-nested values read by a
        regrown step, and anything read across depth regions (computed in an earlier call).
        """
        index = {step.name: i for i, step in enumerate(self._steps)}
        region_of = {}
        for r, (first, stop) in enumerate(self._regions):
            region_of.update({step.name: r for step in self._steps[first:stop]})
        regrown: set[str] = set()
        for step in reversed(self._steps):
            if step.role in ("nested", "grouped", "channel_params", "channelwise") or (
                step.role == "meta" and any(user.name in regrown for user in step.node.users)
            ):
                regrown.add(step.name)
        heads = {self._features} | ({self._split} if self._split is not None else set())
        cached = set(heads)
        last_reader: dict[str, int] = {}
        for step in self._steps:
            for node in step.node.all_input_nodes:
                last_reader[node.name] = index[step.name]
                if region_of[node.name] != region_of[step.name] or (step.name in regrown and node.name not in regrown):
                    cached.add(node.name)
            if step.role == "nested":
                cached.add(step.inputs[0])
        # _last_reads[i]: the values step i is the last to read
        self._last_reads: list[list[str]] = [[] for _ in self._steps]
        for name, reader in last_reader.items():
            self._last_reads[reader].append(name)
        self._regrown = regrown
        self._head_inputs = heads
        self._cached = cached
        # cached multi-group tensors live in full-width buffers that each stage fills group by group
        self._buffered = {name for name in cached if name in regrown and self._by_name[name].role != "meta"}

    def _call(self, step: _Step, fetch, module: nn.Module | None = None) -> Any:
        """Run one node on the values ``fetch`` gives for its inputs (``module`` replaces its layer)."""
        if module is None and step.node.op == "call_module":
            module = self.layers[step.name]
        return call_node(step.node, fetch, module)

    def _channels(self, step: _Step, start: int, stop: int, fetch) -> Tensor:
        """Channels ``start:stop`` of a grouped / channel-param / channel-wise step; ``fetch`` gives
        its channel inputs already cut to the matching channels."""
        whole = start == 0 and stop == len(step.space)  # the layer as it is: no sliced parameters
        if step.role == "grouped" and not whole:
            return grouped_conv_channels(self.layers[step.name], fetch(step.node.all_input_nodes[0]), start, stop)
        if step.role == "channel_params" and not whole:
            return self._call(step, fetch, module=channel_view(self.layers[step.name], slice(start, stop)))
        return self._call(step, fetch)

    def _run_prefix(self, x: Tensor | None, hi: int, values: dict[str, Any], region: tuple[int, int], keep) -> None:
        """Compute groups 0..hi-1 of every tensor of the steps ``region`` = (first, stop) into ``values``.

        ``values[name]`` becomes the first ``offsets[hi]`` channels (un-nested tensors in full);
        inputs are sliced to the channels read, so they may also be longer (buffers of a previous
        region). Values not in ``keep`` are dropped after their last reader.
        """
        for index in range(*region):
            step = self._steps[index]
            name, role = step.name, step.role
            if role == "input":
                values[name] = x
            elif role in ("meta", "fixed"):
                values[name] = self._call(step, lambda n: values[n.name])
            elif role == "nested":
                values[name] = self.layers[name](self._nested_source(step, values, hi), stages=(0, hi))
            elif role not in ("classifier", "output") and step.space.offsets[hi]:
                fetch = lambda n: self._prefix(values, n.name, hi)  # noqa: E731
                values[name] = self._channels(step, 0, step.space.offsets[hi], fetch)
            self._release(index, values, keep)

    def _run_groups(self, lo: int, hi: int, values: dict[str, Any], region: tuple[int, int]) -> None:
        """Staged: compute only groups lo..hi-1 (lo > 0) of the regrown steps of ``region``.

        ``values`` holds the cached values (:meth:`_plan_lifetimes`); buffered tensors get their new
        groups written in. Channel-wise steps read only the new groups of their inputs, which live
        in ``fresh`` until their last reader ran.
        """
        fresh: dict[str, Any] = {}

        def fetch(node: fx.Node):
            name = node.name
            if name in fresh:
                return fresh[name]
            if name in self._buffered:  # written by an earlier region
                space = self._by_name[name].space
                return values[name][:, space.offsets[lo] : space.offsets[hi]]
            return values[name]

        for index in range(*region):
            step = self._steps[index]
            name = step.name
            if name in self._regrown:
                self._grow(step, lo, hi, values, fresh, fetch)
            self._release(index, fresh, set())

    def _grow(self, step: _Step, lo: int, hi: int, values: dict[str, Any], fresh: dict[str, Any], fetch) -> None:
        """Groups lo..hi-1 of one regrown step into ``fresh`` (and its buffer, if cached)."""
        name = step.name
        if step.role == "meta":
            fresh[name] = self._call(step, fetch)
            if name in self._cached:
                values[name] = fresh[name]
            return
        start, stop = step.space.offsets[lo], step.space.offsets[hi]
        if start == stop:
            return
        buffer = values.get(name) if name in self._buffered else None
        if step.role == "nested":
            result = self.layers[name](self._nested_source(step, values, hi), stages=(lo, hi), out=buffer)
        else:
            result = self._channels(step, start, stop, fetch)
            if buffer is not None:
                buffer[:, start:stop] = result
        # a buffered tensor's new groups are read through the buffer, so in-place ops reach it
        fresh[name] = result if buffer is None else buffer[:, start:stop]

    def _nested_source(self, step: _Step, values: dict[str, Any], hi: int) -> Tensor:
        """The input of nested step ``step`` for groups < ``hi``: a full-width buffer as it is (the
        kernels read only the input groups < hi; slicing it would make a non-contiguous view that
        the kernels copy), else its first ``in_offsets[hi]`` channels."""
        value = values[step.inputs[0]]
        layout = self.layers[step.name].layout
        return value if value.shape[1] == layout.in_offsets[-1] else value[:, : layout.in_offsets[hi]]

    def _release(self, index: int, values: dict[str, Any], keep: set[str]) -> None:
        """Drop the values whose last reader is step ``index`` (as an eager forward frees them)."""
        for name in self._last_reads[index]:
            if name not in keep:
                values.pop(name, None)

    def _prefix(self, values: dict[str, Any], name: str, hi: int):
        """The first ``hi`` groups of value ``name`` (as it is if it has no channel space or no more
        channels: a view would turn a later in-place op, such as ``ReLU(inplace=True)``, into a
        view-rebase whose backward copies the whole tensor)."""
        value = values[name]
        space = self._by_name[name].space
        if space is None or value.shape[1] == space.offsets[hi]:
            return value
        return value[:, : space.offsets[hi]]

    def _space_of(self, name: str) -> ChannelSpace:
        return self._by_name[name].space

    def _exit_logits(self, s: int, depth: int, values: dict[str, Any]) -> Tensor:
        """Head of exit (s, depth) on (buffers or prefixes holding at least) its features."""
        if depth == 0:
            split = values[self._split]
            space = self._by_name[self._split].space
            channels = len(space) if space.is_single_group else space.offsets[s]
            return self.classifier(self.depth_heads[s - 1](split[:, :channels]))
        return self.heads[s - 1](values[self._features][:, : self._feature_space.offsets[s]], self.classifier)

    def _depth_regions(self, depth: int) -> list[tuple[int, int]]:
        return self._regions if self._split is None else self._regions[: depth + 1]

    def forward(self, x: Tensor, subnet: int | None = None) -> list[Tensor] | Tensor:
        """``subnet=None``: the logits (N, num_classes) of every exit (:attr:`exits` order), all
        from one pass of N_K. ``subnet=e``: the logits of exit e alone, computing only its groups
        (and, for a shallow exit, only the blocks up to the split).
        """
        values: dict[str, Any] = {}
        if subnet is None:
            self._run_prefix(x, self.num_groups, values, (0, len(self._steps)), self._head_inputs)
            return [self._exit_logits(s, d, values) for s, d in self.exits]
        s, depth = self._exit(subnet)
        for region in self._depth_regions(depth):
            self._run_prefix(x, s, values, region, self._head_inputs)
        return self._exit_logits(s, depth, values)

    def _to_buffers(self, values: dict[str, Any], region: tuple[int, int]) -> None:
        """Move the buffered prefixes of ``region`` into full-width buffers (uninitialised beyond
        the prefix: every later group is written by its stage before anything reads it). Done at
        the first step, not at ``start``: only the samples that go on pay for the full width."""
        for step in self._steps[region[0] : region[1]]:
            if step.name in self._buffered and values[step.name].shape[1] < len(step.space):
                prefix = values[step.name]
                buffer = prefix.new_empty((prefix.shape[0], len(step.space), *prefix.shape[2:]))
                buffer[:, : prefix.shape[1]] = prefix
                values[step.name] = buffer

    def _advance(self, x: Tensor | None, state: StagedState, subnet: int) -> StagedState:
        s, depth = self.exits[subnet - 1]
        for index, region in enumerate(self._depth_regions(depth)):
            done = state.widths[index]
            if done == 0:
                self._run_prefix(x, s, state.values, region, self._cached)
            elif done < s:
                self._to_buffers(state.values, region)
                self._run_groups(done, s, state.values, region)
            state.widths[index] = max(done, s)
        state.subnet = subnet
        state.logits = self._exit_logits(s, depth, state.values)
        return state

    def start(self, x: Tensor) -> StagedState:
        """Run exit 1 (N_1; its shallow exit with a depth split), keeping every tensor in a
        full-width buffer for :meth:`step`."""
        state = StagedState(0, [0] * len(self._regions), x.new_empty(0), {})
        return self._advance(x, state, 1)

    def step(self, state: StagedState, subnet: int | None = None) -> StagedState:
        """To exit ``subnet`` (default: the next one), computing only the new groups of every tensor
        from the cached ones (from N_s to N_t: groups s+1..t of every layer, one kernel call per
        layer however many groups that is)."""
        if not isinstance(state, StagedState):
            raise TypeError(f"state must be a StagedState from start(), got {type(state).__name__}")
        if state.subnet >= self.num_subnets:
            raise ValueError(f"state is already at the last exit {self.num_subnets}")
        if subnet is None:
            subnet = state.subnet + 1
        self._exit(subnet)
        if subnet <= state.subnet:
            raise ValueError(f"subnet must be a later exit than the state's ({state.subnet}), got {subnet}")
        return self._advance(None, state, subnet)

    def exit_logits(self, state: StagedState, subnet: int) -> Tensor:
        """(N, num_classes) logits of an exit the state has already passed (``subnet`` <= its exit):
        only its head runs, on the cached features (what a step that jumped over it skipped)."""
        s, depth = self._exit(subnet)
        regions = range(len(self._depth_regions(depth)))
        if subnet > state.subnet or any(state.widths[region] < s for region in regions):
            raise ValueError(f"subnet must be an exit whose groups the state has computed (<= {state.subnet}, "
                             f"and not a deep exit a jump to a shallow one skipped), got {subnet}")
        return self._exit_logits(s, depth, state.values)

    # ------------------------------------------------------------------------------------------
    # Costs (per sample, at the calibration input size)
    # ------------------------------------------------------------------------------------------

    def _exit_steps(self, depth: int) -> list[_Step]:
        return [step for first, stop in self._depth_regions(depth) for step in self._steps[first:stop]]

    def _head_costs(self, s: int, depth: int) -> tuple[int, int]:
        """(MACs, params) of exit (s, depth)'s head and the shared classifier."""
        classifier = self.classifier.weight.numel()
        classifier_params = sum(p.numel() for p in self.classifier.parameters())
        if depth == 1:  # inference applies alignment and classifier folded (ExitAlignment): F_s·C MACs
            head = self.heads[s - 1]
            return head.in_features * self.classifier.out_features, head.weight.numel() + classifier_params
        conv, norm = self.depth_heads[s - 1][0], self.depth_heads[s - 1][1]
        pixels = math.prod(self._by_name[self._split].shape[2:])
        params = conv.weight.numel() + sum(p.numel() for p in norm.parameters())
        return conv.weight.numel() * pixels + classifier, params + classifier_params

    def macs(self, subnet: int) -> int:
        """Multiply-accumulates of exit ``subnet`` for one sample at the calibration input size.

        Counts conv and linear layers only (BN, activations, adds and pooling are not MACs, as in
        the MobileNet papers): nested layers count only the blocks N_s computes; grouped convs the
        channels N_s computes; un-nested layers in full; plus the exit's head and the shared classifier.
        """
        s, depth = self._exit(subnet)
        total = 0
        for step in self._exit_steps(depth):
            spatial = math.prod(step.shape[2:]) if step.shape is not None else 1
            if step.role == "nested":
                layer = self.layers[step.name]
                kernel = math.prod(layer.kernel_size) if isinstance(layer, NestedConv2d) else 1
                total += layer.layout.useful_macs_per_pixel(0, s) * kernel * spatial
            elif step.role == "grouped":
                conv = self.layers[step.name]
                total += step.space.offsets[s] * conv.weight.shape[1] * math.prod(conv.kernel_size) * spatial
            elif step.role == "fixed" and step.name in self.layers:
                total += _conv_like_macs(self.layers[step.name], step.shape)
        return total + self._head_costs(s, depth)[0]

    def params(self, subnet: int) -> int:
        """Parameters exit ``subnet`` reads: its blocks, channel slices, un-nested layers, its head
        and the classifier."""
        s, depth = self._exit(subnet)
        total = 0
        for step in self._exit_steps(depth):
            layer = self.layers[step.name] if step.name in self.layers else None
            if step.role == "nested":
                kernel = math.prod(layer.kernel_size) if isinstance(layer, NestedConv2d) else 1
                total += layer.layout.useful_macs_per_pixel(0, s) * kernel
                total += 0 if layer.bias is None else layer.layout.out_offsets[s]
            elif step.role in ("grouped", "channel_params"):  # tensors with the channels on dim 0
                total += sum(p[0].numel() * step.space.offsets[s] if p.dim() else 1 for p in layer.parameters())
            elif layer is not None:
                total += sum(p.numel() for p in layer.parameters())
        return total + self._head_costs(s, depth)[1]

    def peak_activation_bytes(self, subnet: int, batch_size: int = 1) -> int:
        """Estimated peak activation memory of running exit ``subnet`` alone (bytes).

        Walks the graph in execution order: every node's output (its N_s channels × pixels × dtype
        size, at the calibration input size) is allocated when computed and freed after its last
        reader; the peak of the live total is returned, times ``batch_size``. In-place ops, the
        head's own activations and allocator caching are ignored; the staged path keeps its cache
        (full-width nested-layer inputs and head inputs) alive instead.
        """
        s, depth = self._exit(subnet)
        steps = self._exit_steps(depth)
        last_reader: dict[str, int] = {}
        for index, step in enumerate(steps):
            for node in step.node.all_input_nodes:
                last_reader[node.name] = index
        last_reader[self._features if depth == 1 else self._split] = len(steps)
        live, peak, sizes = 0, 0, {}
        for index, step in enumerate(steps):
            if step.shape is not None and step.role not in ("classifier", "output"):
                channels = (
                    step.space.offsets[s]
                    if step.space is not None and not step.space.is_single_group
                    else step.shape[1]
                )
                sizes[step.name] = channels * math.prod(step.shape[2:]) * step.itemsize
                live += sizes[step.name]
                peak = max(peak, live)
            for node in step.node.all_input_nodes:
                if last_reader[node.name] == index and node.name in sizes:
                    live -= sizes.pop(node.name)
        return peak * batch_size

    # ------------------------------------------------------------------------------------------
    # Export and rebuilding
    # ------------------------------------------------------------------------------------------

    def export(self, subnet: int) -> fx.GraphModule:
        """Exit ``subnet`` as a plain ``torch.fx.GraphModule`` of stock layers with sliced weights.

        Nested layers become ``nn.Conv2d`` / ``nn.Linear`` on the prefix channels (blocks outside
        the mask zero), BN and grouped convs are sliced, the head is one ``nn.Linear(F_s, C)``
        (alignment and classifier folded) or the shallow alignment block and the classifier. No custom op: it can be
        saved, ``torch.jit.trace``-d and ONNX-exported (custom parameter-free layers of the base
        model, such as TF "same" padding, are copied as they are).
        """
        s, depth = self._exit(subnet)
        steps = self._exit_steps(depth)
        head_name = "subnet_head"
        while head_name in self._by_name:  # a node of the base model may have that name
            head_name += "_"
        root: dict[str, nn.Module] = {}
        graph = fx.Graph()
        mapping: dict[fx.Node, fx.Node] = {}
        for step in steps:
            node = step.node
            if step.role == "classifier":
                root[head_name] = self.heads[s - 1].folded(self.classifier)
                mapping[node] = graph.call_module(head_name, (mapping[node.args[0]],))
            elif node.op == "call_module":
                root[step.name] = self._export_layer(step, s)
                mapping[node] = graph.call_module(step.name, *fx.node.map_arg((node.args, node.kwargs), mapping.get))
            else:
                mapping[node] = graph.node_copy(node, lambda n: mapping[n])
        if depth == 0:
            root[head_name] = nn.Sequential(*copy.deepcopy(self.depth_heads[s - 1]), copy.deepcopy(self.classifier))
            graph.output(graph.call_module(head_name, (mapping[self._by_name[self._split].node],)))
        exported = fx.GraphModule(root, graph)
        if depth == 0:  # drop what only fed the later blocks
            exported.graph.eliminate_dead_code()
            exported.delete_all_unused_submodules()
            exported.recompile()
        return exported.train(self.training)

    def _export_layer(self, step: _Step, s: int) -> nn.Module:
        layer = self.layers[step.name]
        if step.role == "nested":
            return layer.export_linear(s) if isinstance(layer, NestedLinear) else layer.export_conv(s)
        if step.role == "grouped":
            in_channels = self._space_of(step.inputs[0]).offsets[s]
            out_channels = step.space.offsets[s]
            sliced = nn.Conv2d(
                in_channels,
                out_channels,
                layer.kernel_size,
                layer.stride,
                layer.padding,
                layer.dilation,
                groups=out_channels // (layer.out_channels // layer.groups),
                bias=layer.bias is not None,
                device=layer.weight.device,
                dtype=layer.weight.dtype,
            )
            with torch.no_grad():
                sliced.weight.copy_(layer.weight[:out_channels])
                if layer.bias is not None:
                    sliced.bias.copy_(layer.bias[:out_channels])
            return sliced
        if step.role == "channel_params":
            return copy.deepcopy(channel_view(layer, slice(0, step.space.offsets[s]), copy_values=True))
        return copy.deepcopy(layer)

    @classmethod
    def from_config(cls, config: NestRecord | dict, model: nn.Module | None = None) -> RussianDollNet:
        """Rebuild the structure a record describes (weights are then loaded with ``load_state_dict``).

        Args:
            config: the :attr:`record` of the RDN to rebuild, its ``to_dict()`` form, or its
                :attr:`rdn_config` (also of older versions).
            model: a base model of the same architecture; default: ``rdn.models.create(**record.base)``.
        """
        from rdn.surgery.nest import build_from_config

        return build_from_config(config, model)
