"""``RussianDollNet``: the executor of a surgery plan: K nested sub-networks N_1 ⊂ ... ⊂ N_K of one base model.

The RDN runs the steps of its :class:`~rdn.surgery.plan.Plan` (the base model's traced dataflow
graph) over *channel prefixes*: sub-network N_s computes the channels of groups 0..s-1 of every
tensor (``offsets[s]`` channels of its space) and nothing else. Nested layers get ``stages=(0, s)``;
BN, grouped / depthwise convs and channel-wise ops get the matching channel slice of their
parameters; un-nested (single-group) tensors are computed in full by N_1.

Three ways to run it:

- ``forward(x)``: one pass of N_K; every sub-network's features are a prefix of N_K's, so the K
  heads give the K logits from that single pass (what joint training uses);
- ``forward(x, subnet=s)``: N_s alone;
- ``start(x)`` / ``step(state)``: N_1, then N_2, ... computing only the new group of every tensor
  (``stages=(s, s+1)`` for nested layers, which read the cached prefixes of their inputs; channel-wise
  steps read only the new groups of theirs). The cache grows to the width of the exit reached; the
  step to the last exit writes into full-width buffers and frees the cache as it is read. Only what
  a later stage reads is cached (the plan's :class:`~rdn.surgery.plan.Lifetimes`): nested-layer
  inputs and the heads' inputs;
  ``state.index_select(kept)`` drops the samples that exited, copying only that cache.

Every path frees an intermediate after its last reader, as an eager forward does.

Depth split (``nest(..., depth_split=...)``): the steps up to the split block form the shallow
part; every width s gets a second exit there, so there are 2K sub-networks ("exits"). Every method
indexes sub-networks by their exit number e = 1..``num_subnets``; :attr:`RussianDollNet.exits`
maps it to (width s, depth), in the order (1, 0), (1, 1), (2, 0), ... that ``forward(x)`` and
``step`` follow (without a split, exit e is N_e at full depth). N_{s,0}'s features are never
updated by N_{s,1}, which reads them.

Heads (:mod:`rdn.surgery.build`): ``heads[s - 1]`` is the full-depth exit's ``nn.Linear(F_s, C)``
(its alignment and the base classifier, folded); ``depth_heads[s - 1]`` the shallow exit's
alignment block, followed by ``classifier``, which the shallow exits share (``nn.Identity()``
without a depth split). Costs (:mod:`rdn.surgery.costs`) and the export
(:mod:`rdn.surgery.export`) are functions of the plan; the methods here call them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from rdn.nn import NestedConv2d, NestedLinear
from rdn.surgery import costs
from rdn.surgery.build import Modules, rebuild
from rdn.surgery.coverage import Coverage, coverage
from rdn.surgery.export import export_exit
from rdn.surgery.graph import call_node, concat_inputs
from rdn.surgery.plan import Plan, Role, Step
from rdn.surgery.record import NestRecord
from rdn.surgery.spaces import ChannelSpace, ConcatSpace, channel_view, concat_groups

__all__ = ["RussianDollNet", "StagedState"]


@dataclass
class StagedState:
    """What :meth:`RussianDollNet.step` needs to go from one exit to the next.

    Attributes:
        subnet: the exit computed so far (1-based, :attr:`RussianDollNet.exits` order).
        widths: groups computed so far in each depth region (shallow part, rest).
        logits: (N, num_classes) of that exit.
        values: only what a later stage reads: the input of every nested layer and the tensors
            the heads read, as prefixes of the exit reached (the groups computed so far), plus
            the un-nested tensors and values that
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


class RussianDollNet(nn.Module):
    """K nested sub-networks of one base model (module docstring). Build it with :func:`rdn.surgery.nest`
    (or :meth:`from_config` from a record).

    Args:
        plan: what to execute (:mod:`rdn.surgery.plan`).
        modules: the layers and heads :func:`rdn.surgery.build.build_modules` made for ``plan``.
    """

    # State-dict layout: 2 stores every full-depth head folded, nn.Linear(F_s, C); 1 stored the
    # alignment nn.Linear(F_s, F, bias=False) and applied the shared classifier after it (still loaded).
    _version = 2

    def __init__(self, plan: Plan, modules: Modules) -> None:
        super().__init__()
        self._plan = plan
        self.layers = nn.ModuleDict(modules.layers)
        self.classifier = modules.classifier
        self.heads = nn.ModuleList(modules.heads)
        self.depth_heads = nn.ModuleList(modules.depth_heads)
        self.train(modules.training)

    # ------------------------------------------------------------------------------------------
    # What it is
    # ------------------------------------------------------------------------------------------

    @property
    def plan(self) -> Plan:
        """The plan this network executes (plain data, :mod:`rdn.surgery.plan`)."""
        return self._plan

    @property
    def record(self) -> NestRecord:
        """The surgery's options and findings that rebuild this network (:meth:`from_config`)."""
        return self._plan.record

    @property
    def rdn_config(self) -> dict:
        """Read-only compatibility view of :attr:`record`: a new dict in the flat version-1 layout
        (``{"version": 1, "k", "mode", ..., "orders", "pruned_blocks", "ties"}``) on every access, so
        writing into it changes nothing. ``from_config`` takes it; new code reads :attr:`record`."""
        return self._plan.record.to_legacy_dict()

    @property
    def num_groups(self) -> int:
        """K: the channel groups of every nested tensor (widths 1..K)."""
        return self._plan.num_groups

    @property
    def exits(self) -> list[tuple[int, int]]:
        """(width s, depth) of every exit, in exit order (module docstring)."""
        return list(self._plan.exits)

    @property
    def num_subnets(self) -> int:
        """Number of sub-networks (exits): K, or 2K with a depth split (:attr:`exits` maps them)."""
        return self._plan.num_subnets

    def nested_layers(self) -> dict[str, NestedConv2d | NestedLinear]:
        """The nested layers (graph node name → layer), in execution order."""
        return {step.name: self.layers[step.name] for step in self._plan.nested_steps()}

    def nested_spaces(self, name: str) -> tuple[ChannelSpace | ConcatSpace, ChannelSpace | ConcatSpace]:
        """(input space, output space) of nested layer ``name``: the channel copies it reads and writes."""
        step = self._plan.step(name)
        return step.input_space, step.space

    def layer_spaces(self) -> dict[str, ChannelSpace | ConcatSpace]:
        """The output channel space of every layer of :attr:`layers` that writes channels (graph node
        name → space; single-group for un-nested layers), in execution order. Channels of group q are
        ``space.offsets[q]:space.offsets[q + 1]`` of the layer's output and of its per-channel tensors."""
        return {step.name: step.space for step in self._plan.layer_steps() if step.space is not None}

    def base_module_name(self, name: str) -> str:
        """Qualified name, in the base model, of the module layer ``name`` (a key of :attr:`layers`) was made from."""
        if name not in self.layers:
            raise ValueError(f"name must be a layer of this RDN (a key of .layers: {list(self.layers)}), got {name!r}")
        return self._plan.step(name).module

    def use_plan(self, plan: Plan) -> None:
        """Execute ``plan`` from now on: an edit of this network's plan (the same steps and channel
        spaces, e.g. :meth:`Plan.with_pruned_blocks`). The nested layers take its block masks
        (weights of dropped blocks are zeroed)."""
        old = [(step.name, step.role, step.space, step.input_space) for step in self._plan.steps]
        new = [(step.name, step.role, step.space, step.input_space) for step in plan.steps]
        if old != new or plan.heads != self._plan.heads or plan.exits != self._plan.exits:
            raise ValueError("plan must be an edit of this network's plan (the same steps, spaces and exits)")
        for step in plan.nested_steps():
            layer = self.layers[step.name]
            if layer.layout.mask != step.layer.layout.mask:
                layer.set_block_mask(step.layer.layout.mask)
        self._plan = plan

    # ------------------------------------------------------------------------------------------
    # Running
    # ------------------------------------------------------------------------------------------

    def _call(self, step: Step, fetch, module: nn.Module | None = None) -> Any:
        """Run one node on the values ``fetch`` gives for its inputs (``module`` replaces its layer)."""
        if module is None and step.node.op == "call_module":
            module = self.layers[step.name]
        return call_node(step.node, fetch, module)

    def _channels(self, step: Step, lo: int, hi: int, fetch) -> Tensor:
        """Groups ``lo..hi-1`` of a grouped / channel-param / channel-wise / concatenation step; ``fetch``
        gives its channel inputs already cut to the matching groups."""
        if step.role is Role.CONCAT:
            parts = concat_inputs(step.node)
            spaces = [self._plan.step(part.name).space for part in parts]
            # a part without channels in these groups was not computed by this stage: nothing to fetch
            values = [fetch(part) if space.offsets[lo] < space.offsets[hi] else None
                      for part, space in zip(parts, spaces, strict=True)]  # fmt: skip
            return concat_groups(values, spaces, lo, hi)
        if step.role is Role.GROUPWISE:
            return self.layers[step.name](fetch(step.node.all_input_nodes[0]), groups=(lo, hi))
        start, stop = step.space.offsets[lo], step.space.offsets[hi]
        whole = start == 0 and stop == len(step.space)  # the layer as it is: no sliced parameters
        if step.role is Role.GROUPED and not whole:
            return grouped_conv_channels(self.layers[step.name], fetch(step.node.all_input_nodes[0]), start, stop)
        if step.role is Role.CHANNEL_PARAMS and not whole:
            return self._call(step, fetch, module=channel_view(self.layers[step.name], slice(start, stop)))
        return self._call(step, fetch)

    def _run_prefix(self, x: Tensor | None, hi: int, values: dict[str, Any], region: tuple[int, int], keep) -> None:
        """Compute groups 0..hi-1 of every tensor of the steps ``region`` = (first, stop) into ``values``.

        ``values[name]`` becomes the first ``offsets[hi]`` channels (un-nested tensors in full);
        inputs are sliced to the channels read, so they may also be longer (buffers of a previous
        region). Values not in ``keep`` are dropped after their last reader.
        """
        steps = self._plan.steps
        for index in range(*region):
            step = steps[index]
            name, role = step.name, step.role
            if role is Role.INPUT:
                values[name] = x
            elif role in (Role.META, Role.FIXED):
                values[name] = self._call(step, lambda n: values[n.name])
            elif role is Role.NESTED:
                values[name] = self.layers[name](self._nested_source(step, values, hi), stages=(0, hi))
            elif role not in (Role.CLASSIFIER, Role.OUTPUT) and step.space.offsets[hi]:
                fetch = lambda n: self._prefix(values, n.name, hi)  # noqa: E731
                values[name] = self._channels(step, 0, hi, fetch)
            self._release(index, values, keep)

    def _run_groups(self, lo: int, hi: int, values: dict[str, Any], region: tuple[int, int], final: bool) -> None:
        """Staged: compute only groups lo..hi-1 (lo > 0) of the regrown steps of ``region``.

        ``values`` holds the cached values (the plan's lifetimes); buffered tensors get their new
        groups written in. Channel-wise steps read only the new groups of their inputs, which live
        in ``fresh`` until their last reader ran. ``final`` (the last exit: no later stage reads the
        cache): each buffer is widened only when its step runs and every cached value but the
        heads' inputs is dropped after its last reader, as a static forward frees them, so the
        step's peak memory is near static N_K's instead of every layer's full width at once.
        """
        fresh: dict[str, Any] = {}
        lifetimes = self._plan.lifetimes

        def fetch(node: fx.Node):
            name = node.name
            if name in fresh:
                return fresh[name]
            if name in lifetimes.buffered:  # written by an earlier region
                space = self._plan.step(name).space
                return values[name][:, space.offsets[lo] : space.offsets[hi]]
            return values[name]

        for index in range(*region):
            step = self._plan.steps[index]
            if step.name in lifetimes.regrown:
                if final:
                    self._to_buffer(values, step)
                self._grow(step, lo, hi, values, fresh, fetch)
            self._release(index, fresh, set())
            if final:
                self._release(index, values, lifetimes.head_inputs)

    def _grow(self, step: Step, lo: int, hi: int, values: dict[str, Any], fresh: dict[str, Any], fetch) -> None:
        """Groups lo..hi-1 of one regrown step into ``fresh`` (and its buffer, if cached)."""
        name, lifetimes = step.name, self._plan.lifetimes
        if step.role is Role.META:
            fresh[name] = self._call(step, fetch)
            if name in lifetimes.cached:
                values[name] = fresh[name]
            return
        start, stop = step.space.offsets[lo], step.space.offsets[hi]
        if start == stop:
            return
        buffer = values.get(name) if name in lifetimes.buffered else None
        if buffer is not None and buffer.shape[1] < len(step.space):
            # A stage before the last: the cache grows by concatenation to this stage's width only (a
            # full-width buffer of every cached tensor would hold the later groups' memory already).
            if step.role is Role.NESTED:
                result = self.layers[name](self._nested_source(step, values, hi), stages=(lo, hi))
            else:
                result = self._channels(step, lo, hi, fetch)
            grown = torch.cat([buffer[:, :start], result], dim=1)
            values[name] = grown
            fresh[name] = grown[:, start:stop]  # read through the cache, so in-place ops reach it
            return
        if step.role is Role.NESTED:
            result = self.layers[name](self._nested_source(step, values, hi), stages=(lo, hi), out=buffer)
        else:
            result = self._channels(step, lo, hi, fetch)
            if buffer is not None:
                buffer[:, start:stop] = result
        # a buffered tensor's new groups are read through the buffer, so in-place ops reach it
        fresh[name] = result if buffer is None else buffer[:, start:stop]

    def _nested_source(self, step: Step, values: dict[str, Any], hi: int) -> Tensor:
        """The input of nested step ``step`` for groups < ``hi``: a full-width buffer as it is (the
        kernels read only the input groups < hi; slicing it would make a non-contiguous view that
        the kernels copy), else its first ``in_offsets[hi]`` channels."""
        value = values[step.inputs[0]]
        layout = step.layer.layout
        return value if value.shape[1] == layout.in_offsets[-1] else value[:, : layout.in_offsets[hi]]

    def _release(self, index: int, values: dict[str, Any], keep) -> None:
        """Drop the values whose last reader is step ``index`` (as an eager forward frees them)."""
        for name in self._plan.lifetimes.last_reads[index]:
            if name not in keep:
                values.pop(name, None)

    def _prefix(self, values: dict[str, Any], name: str, hi: int):
        """The first ``hi`` groups of value ``name`` (as it is if it has no channel space or no more
        channels: a view would turn a later in-place op, such as ``ReLU(inplace=True)``, into a
        view-rebase whose backward copies the whole tensor)."""
        value = values[name]
        space = self._plan.step(name).space
        if space is None or value.shape[1] == space.offsets[hi]:
            return value
        return value[:, : space.offsets[hi]]

    def _exit_logits(self, s: int, depth: int, values: dict[str, Any]) -> Tensor:
        """Head of exit (s, depth) on (buffers or prefixes holding at least) its features."""
        heads = self._plan.heads
        if depth == 0:
            split = values[heads.split]
            space = self._plan.step(heads.split).space
            channels = len(space) if space.is_single_group else space.offsets[s]
            return self.classifier(self.depth_heads[s - 1](split[:, :channels]))
        return self.heads[s - 1](values[heads.features][:, : heads.features_of(s)])

    def forward(self, x: Tensor, subnet: int | None = None) -> list[Tensor] | Tensor:
        """``subnet=None``: the logits (N, num_classes) of every exit (:attr:`exits` order), all
        from one pass of N_K. ``subnet=e``: the logits of exit e alone, computing only its groups
        (and, for a shallow exit, only the blocks up to the split).
        """
        values: dict[str, Any] = {}
        keep = self._plan.lifetimes.head_inputs
        if subnet is None:
            self._run_prefix(x, self.num_groups, values, (0, len(self._plan.steps)), keep)
            return [self._exit_logits(s, d, values) for s, d in self._plan.exits]
        s, depth = self._plan.exit(subnet)
        for region in self._plan.regions_for(depth):
            self._run_prefix(x, s, values, region, keep)
        return self._exit_logits(s, depth, values)

    def _to_buffer(self, values: dict[str, Any], step: Step) -> None:
        """One step's cached prefix into a full-width buffer (uninitialised beyond the prefix: the
        stage writes every later group before anything reads it), for the step to the last exit,
        whose nested layers then write their new groups straight into it (``out=``)."""
        if step.name in self._plan.lifetimes.buffered and values[step.name].shape[1] < len(step.space):
            prefix = values[step.name]
            buffer = prefix.new_empty((prefix.shape[0], len(step.space), *prefix.shape[2:]))
            buffer[:, : prefix.shape[1]] = prefix
            values[step.name] = buffer

    def _advance(self, x: Tensor | None, state: StagedState, subnet: int) -> StagedState:
        s, depth = self._plan.exits[subnet - 1]
        for index, region in enumerate(self._plan.regions_for(depth)):
            done = state.widths[index]
            if done == 0:
                self._run_prefix(x, s, state.values, region, self._plan.lifetimes.cached)
            elif done < s:
                final = subnet == self.num_subnets  # nothing steps further: free the cache as it is read
                self._run_groups(done, s, state.values, region, final)
            state.widths[index] = max(done, s)
        state.subnet = subnet
        state.logits = self._exit_logits(s, depth, state.values)
        return state

    def start(self, x: Tensor) -> StagedState:
        """Run exit 1 (N_1; its shallow exit with a depth split), keeping what :meth:`step` reads."""
        state = StagedState(0, [0] * len(self._plan.regions), x.new_empty(0), {})
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
        self._plan.exit(subnet)
        if subnet <= state.subnet:
            raise ValueError(f"subnet must be a later exit than the state's ({state.subnet}), got {subnet}")
        return self._advance(None, state, subnet)

    def exit_logits(self, state: StagedState, subnet: int) -> Tensor:
        """(N, num_classes) logits of an exit the state has already passed (``subnet`` <= its exit):
        only its head runs, on the cached features (what a step that jumped over it skipped)."""
        s, depth = self._plan.exit(subnet)
        regions = range(len(self._plan.regions_for(depth)))
        if subnet > state.subnet or any(state.widths[region] < s for region in regions):
            raise ValueError(f"subnet must be an exit whose groups the state has computed (<= {state.subnet}, "
                             f"and not a deep exit a jump to a shallow one skipped), got {subnet}")  # fmt: skip
        return self._exit_logits(s, depth, state.values)

    # ------------------------------------------------------------------------------------------
    # Costs and export: functions of the plan (rdn.surgery.costs, rdn.surgery.export)
    # ------------------------------------------------------------------------------------------

    def macs(self, subnet: int) -> int:
        """Multiply-accumulates of exit ``subnet`` for one sample at the calibration input size
        (:func:`rdn.surgery.costs.macs`: conv and linear layers, only what the exit computes)."""
        return costs.macs(self._plan, subnet)

    def params(self, subnet: int) -> int:
        """Parameters exit ``subnet`` reads (:func:`rdn.surgery.costs.params`)."""
        return costs.params(self._plan, subnet)

    def peak_activation_bytes(self, subnet: int, batch_size: int = 1) -> int:
        """Estimated peak activation memory of running exit ``subnet`` alone, in bytes
        (:func:`rdn.surgery.costs.peak_activation_bytes`)."""
        return costs.peak_activation_bytes(self._plan, subnet, batch_size)

    def coverage(self) -> Coverage:
        """How much of the base model is nested: shares of its MACs and parameters in nested layers and
        why the rest is not (:func:`rdn.surgery.coverage.coverage`; ``.report()`` gives markdown)."""
        return coverage(self._plan)

    def export(self, subnet: int) -> fx.GraphModule:
        """Exit ``subnet`` as a plain ``torch.fx.GraphModule`` of stock layers with sliced weights
        (:func:`rdn.surgery.export.export_exit`), in this network's mode."""
        return export_exit(self._plan, self.layers, self.heads, self.depth_heads, self.classifier, subnet,
                           self.training)  # fmt: skip

    # ------------------------------------------------------------------------------------------
    # Rebuilding and loading
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: NestRecord | dict, model: nn.Module | None = None) -> RussianDollNet:
        """Rebuild the structure a record describes (weights are then loaded with ``load_state_dict``).

        Args:
            config: the :attr:`record` of the RDN to rebuild, its ``to_dict()`` form, or its
                :attr:`rdn_config` (also of older versions).
            model: a base model of the same architecture; default: ``rdn.models.create(**record.base)``.
        """
        return cls(*rebuild(NestRecord.read(config), model))

    def upgrade_state_dict(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``state_dict`` in this network's current layout: a state dict of an older version (full-depth
        heads stored as alignments before the shared classifier, :attr:`_version` 1) gets its heads
        folded; a current one comes back as it is. ``load_state_dict`` does this by itself; this is
        for callers that compare keys and shapes first."""
        upgraded = type(state_dict)(state_dict) if isinstance(state_dict, dict) else dict(state_dict)
        metadata = getattr(state_dict, "_metadata", None)
        version = metadata.get("", {}).get("version") if metadata is not None else None
        if self._fold_heads(upgraded, "", version) and metadata is not None:
            upgraded._metadata = type(metadata)(metadata)
            upgraded._metadata[""] = {**metadata.get("", {}), "version": self._version}
        return upgraded

    def _fold_heads(self, state_dict: dict[str, Tensor], prefix: str, version: int | None) -> bool:
        """Fold version-1 heads of ``state_dict`` in place: W_s = W_classifier · A_s, bias the classifier's.

        Version 1 is told by the head's shape, (F, F_s) against (C, F_s), and by the metadata version
        when F = C. Returns whether it folded.
        """
        heads = self._plan.heads
        first, classifier = state_dict.get(f"{prefix}heads.0.weight"), state_dict.get(f"{prefix}classifier.weight")
        if first is None or classifier is None or classifier.dim() != 2 or classifier.shape[1] != first.shape[0]:
            return False
        unfolded = first.shape[0] != heads.num_classes or (version is not None and version < 2)
        if not unfolded:
            return False
        bias = state_dict.get(f"{prefix}classifier.bias")
        for s in range(1, self.num_groups + 1):
            key = f"{prefix}heads.{s - 1}.weight"
            state_dict[key] = classifier @ state_dict[key].to(classifier.device)
            if bias is not None:
                state_dict[f"{prefix}heads.{s - 1}.bias"] = bias.clone()
        if heads.split is None:  # the classifier lives on in the folded heads only
            state_dict.pop(f"{prefix}classifier.weight")
            state_dict.pop(f"{prefix}classifier.bias", None)
        return True

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # fmt: skip
        self._fold_heads(state_dict, prefix, local_metadata.get("version"))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
