"""The surgery's plan: what a :class:`~rdn.surgery.network.RussianDollNet` executes, as plain data.

The surgery (:func:`rdn.nest`) analyses the base model (:mod:`rdn.surgery.graph`), chooses the
channel orders (:mod:`rdn.surgery.passes.select`) and writes down, in a :class:`Plan`:

- one :class:`Step` per node of the traced graph, in execution order: its :class:`Role`, the
  channel spaces it reads and writes (:class:`~rdn.surgery.spaces.ChannelSpace`), its output shape at
  the calibration input size and the static facts of its layer that the costs need (for a nested
  layer its :class:`~rdn_kernels.layout.NestedLayout`: splits and block mask);
- the heads (:class:`HeadPlan`): which tensor the full-depth heads read, the feature and class
  counts, the depth split;
- the exits and depth regions, and the buffer lifetimes (:class:`Lifetimes`) of every path;
- the :class:`~rdn.surgery.record.NestRecord` it was made from (options and findings).

Nothing here holds weights or runs anything: the network executes a plan
(:mod:`rdn.surgery.network`), the costs (:mod:`rdn.surgery.costs`) and the export
(:mod:`rdn.surgery.export`) are functions of it, and a pass edits it by returning a new one
(:meth:`Plan.with_pruned_blocks`).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch.fx as fx

from rdn.surgery.record import NestRecord
from rdn.surgery.spaces import ChannelSpace, ConcatSpace
from rdn_kernels import make_layout
from rdn_kernels.layout import NestedLayout

__all__ = [
    "SKIPPED_REASON",
    "ChannelParamsLayer",
    "FixedLayer",
    "GroupedLayer",
    "HeadPlan",
    "Lifetimes",
    "NestedStepLayer",
    "Plan",
    "Role",
    "Step",
    "plan_lifetimes",
]


# Why a skipped layer is un-nested (Plan.unnested, the coverage report).
SKIPPED_REASON = "kept un-nested by skip"


class Role(enum.Enum):
    """What a traced node is to the surgery (by the type of what it calls, never by attribute names)."""

    INPUT = "input"  # the model input
    META = "meta"  # makes no channel tensor (x.size(0), tuples): recomputed as it is
    FIXED = "fixed"  # un-nested (single-group output): computed whole by N_1
    NESTED = "nested"  # nn.Conv2d (groups = 1) / nn.Linear → NestedConv2d / NestedLinear
    GROUPED = "grouped"  # grouped / depthwise nn.Conv2d: acts per conv group
    CHANNEL_PARAMS = "channel_params"  # per-channel parameters (BN, BN + act, a layer scale): run on a channel slice
    CHANNELWISE = "channelwise"  # parameter-free and per channel (activations, adds, pooling, ...)
    CONCAT = "concat"  # torch.cat on the channels: group q of the result is every part's group q
    GROUPWISE = "groupwise"  # a channel-coupling norm made nesting-safe: statistics per group (GroupedNorm)
    OPAQUE = "opaque"  # couples channels: allowed in the un-nested part only, where it becomes FIXED
    CLASSIFIER = "classifier"  # the base classifier (replaced by the heads)
    OUTPUT = "output"

    @property
    def per_group(self) -> bool:
        """Whether the node can compute a channel group of its output from that group of its inputs
        (so a stage s → t computes only groups s..t-1 of it)."""
        return self in (
            Role.NESTED, Role.GROUPED, Role.CHANNEL_PARAMS, Role.CHANNELWISE, Role.CONCAT, Role.GROUPWISE
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# What the costs need of a step's layer (taken from the base module when the plan is made)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NestedStepLayer:
    """A nested conv / linear layer: its splits and block mask, kernel elements (1 for linear), bias."""

    layout: NestedLayout
    kernel: int
    bias: bool


@dataclass(frozen=True)
class GroupedLayer:
    """A grouped / depthwise conv: input channels per conv group, kernel elements, bias."""

    group_inputs: int
    kernel: int
    bias: bool


@dataclass(frozen=True)
class ChannelParamsLayer:
    """A per-channel module: how many 1-D per-channel parameters and 0-d parameters it has."""

    channel_tensors: int
    scalar_params: int


@dataclass(frozen=True)
class FixedLayer:
    """An un-nested module, run whole: its parameters and MACs per sample (conv / linear only)."""

    params: int
    macs: int


StepLayer = NestedStepLayer | GroupedLayer | ChannelParamsLayer | FixedLayer


@dataclass(frozen=True)
class Step:
    """One node of the traced base model as the RDN runs it.

    Attributes:
        node: the ``torch.fx`` node (what it calls and on which values).
        role: see :class:`Role` (``OPAQUE`` never appears in a plan).
        space: channel space of the output; None when it carries no channels.
        input_space: channel space of the first channel input (what a nested / grouped layer reads).
        shape: output shape at the calibration input size, batch of 1 first; None if not a tensor.
        itemsize: bytes per element of the output (0 if not a tensor).
        inputs: names of the channel-carrying values it reads.
        module: qualified name, in the base model, of the module it calls when the RDN holds a layer
            for it (a key of ``RussianDollNet.layers``); None otherwise (functions, the classifier).
        layer: the static facts of that layer the costs need.
    """

    node: fx.Node
    role: Role
    space: ChannelSpace | ConcatSpace | None
    input_space: ChannelSpace | ConcatSpace | None
    shape: tuple[int, ...] | None
    itemsize: int
    inputs: tuple[str, ...]
    module: str | None = None
    layer: StepLayer | None = None

    @property
    def name(self) -> str:
        return self.node.name


@dataclass(frozen=True)
class HeadPlan:
    """The exits' heads.

    A full-depth exit of width s reads the first ``features_of(s)`` channels (F_s) of ``features``
    (the pooled features, (N, F') in ``feature_space``) and maps them with one folded linear layer
    to the ``num_classes`` logits. With a depth split, a shallow exit of width s reads ``split``'s
    groups < s, maps them to ``feature_width`` (F) channels with a light alignment block
    (1×1 conv → BN → ReLU → pool) and applies the classifier the shallow exits share.
    """

    features: str
    feature_space: ChannelSpace | ConcatSpace
    feature_width: int
    num_classes: int
    bias: bool
    split: str | None = None

    def features_of(self, s: int) -> int:
        """F_s: the feature channels the full-depth exit of width s reads."""
        return self.feature_space.offsets[s]


@dataclass(frozen=True)
class Lifetimes:
    """How long each value lives on each path (:func:`plan_lifetimes`).

    Attributes:
        last_reads: per step, the values it is the last to read (freed after it, as eager frees them).
        regrown: steps a stage s → t recomputes (only their new groups): per-group steps and the
            meta values they read.
        head_inputs: what the heads read (features, split tensor): kept until the heads ran.
        cached: what the staged path keeps between stages: the input of every nested layer, the head
            inputs, un-nested values a regrown step reads, values read across depth regions.
        buffered: the cached multi-group tensors, kept in full-width buffers filled group by group.
    """

    last_reads: tuple[tuple[str, ...], ...]
    regrown: frozenset[str]
    head_inputs: frozenset[str]
    cached: frozenset[str]
    buffered: frozenset[str]


def plan_lifetimes(
    steps: tuple[Step, ...], regions: tuple[tuple[int, int], ...], head_inputs: frozenset[str]
) -> Lifetimes:
    """The lifetimes of ``steps`` run in depth ``regions`` (see :class:`Lifetimes`).

    A stage recomputes only the regrown steps, and only their new groups; the per-group ones read
    just the new groups of their inputs. So a stage reads from earlier ones only: the full input of
    every nested layer, what the heads read, un-nested values read by a regrown step, and anything
    read across depth regions (computed by an earlier call).
    """
    index = {step.name: i for i, step in enumerate(steps)}
    region_of = {steps[i].name: r for r, (first, stop) in enumerate(regions) for i in range(first, stop)}
    regrown: set[str] = set()
    for step in reversed(steps):
        if step.role.per_group or (step.role is Role.META and any(user.name in regrown for user in step.node.users)):
            regrown.add(step.name)
    cached = set(head_inputs)
    last_reader: dict[str, int] = {}
    for step in steps:
        for node in step.node.all_input_nodes:
            last_reader[node.name] = index[step.name]
            if region_of[node.name] != region_of[step.name] or (step.name in regrown and node.name not in regrown):
                cached.add(node.name)
        if step.role is Role.NESTED:
            cached.add(step.inputs[0])
    last_reads: list[list[str]] = [[] for _ in steps]
    for name, reader in last_reader.items():
        last_reads[reader].append(name)
    by_name = {step.name: step for step in steps}
    buffered = {name for name in cached if name in regrown and by_name[name].role is not Role.META}
    return Lifetimes(
        tuple(tuple(names) for names in last_reads),
        frozenset(regrown),
        frozenset(head_inputs),
        frozenset(cached),
        frozenset(buffered),
    )


@dataclass(frozen=True)
class Plan:
    """Everything a Russian doll network executes (module docstring).

    Attributes:
        record: the options and findings the plan was made from.
        steps: every node, in execution order.
        num_groups: K, the channel groups of every nested tensor.
        heads: the exits' heads.
        exits: (width s, depth) of every exit, in the order ``forward(x)`` and ``step`` follow:
            (1, 1), (2, 1), ... without a depth split; (1, 0), (1, 1), (2, 0), ... with one (depth 0:
            the shallow exit).
        regions: (first, stop) step indices of the depth regions: the whole graph, or the steps up to
            the split node and the rest.
        lifetimes: how long every value lives (:func:`plan_lifetimes`).
        unnested: (step name, why) of every un-nested layer (what the coverage report names: the
            skip, or the node whose channels must stay whole and what it does).
        after_classifier: the shape-only nodes after the base classifier that the heads replace
            (identity, flatten, dropout, reshape), as error messages name them.
    """

    record: NestRecord
    steps: tuple[Step, ...]
    num_groups: int
    heads: HeadPlan
    exits: tuple[tuple[int, int], ...]
    regions: tuple[tuple[int, int], ...]
    lifetimes: Lifetimes
    unnested: tuple[tuple[str, str], ...] = ()
    after_classifier: tuple[str, ...] = ()

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {step.name: i for i, step in enumerate(self.steps)}

    def __deepcopy__(self, memo: dict) -> Plan:
        # Immutable plain data: a copied network shares it. Copying would walk the traced graph node by
        # node through their links, past Python's recursion limit on a model of a few hundred nodes.
        return self

    @property
    def num_subnets(self) -> int:
        """Number of exits: K, or 2K with a depth split."""
        return len(self.exits)

    def step(self, name: str) -> Step:
        """The step of graph node ``name`` (KeyError naming it when there is none)."""
        try:
            return self.steps[self._index[name]]
        except KeyError:
            raise KeyError(f"{name!r} is not a node of this plan") from None

    def position(self, name: str) -> int:
        """Index of node ``name`` in :attr:`steps`."""
        return self._index[name]

    def region_of(self, name: str) -> int:
        """The depth region (index into :attr:`regions`) of node ``name``."""
        position = self.position(name)
        return next(r for r, (first, stop) in enumerate(self.regions) if first <= position < stop)

    def exit(self, subnet: int, what: str = "subnet") -> tuple[int, int]:
        """(width s, depth) of exit number ``subnet`` (1-based), checked."""
        if isinstance(subnet, bool) or not isinstance(subnet, int):
            raise TypeError(f"{what} must be an int in 1..{self.num_subnets}, got {subnet!r}")
        if not 1 <= subnet <= self.num_subnets:
            raise ValueError(
                f"{what} must satisfy 1 <= {what} <= {self.num_subnets} (the number of exits), got {subnet}"
            )
        return self.exits[subnet - 1]

    def regions_for(self, depth: int) -> tuple[tuple[int, int], ...]:
        """The depth regions an exit of ``depth`` runs: all of them at full depth, the first when shallow."""
        return self.regions if self.heads.split is None else self.regions[: depth + 1]

    def exit_steps(self, depth: int) -> list[Step]:
        """The steps an exit of ``depth`` runs, in order."""
        return [step for first, stop in self.regions_for(depth) for step in self.steps[first:stop]]

    def nested_steps(self) -> list[Step]:
        """The nested layers' steps, in execution order."""
        return [step for step in self.steps if step.role is Role.NESTED]

    def layer_steps(self) -> list[Step]:
        """The steps the RDN holds a layer for (its ``layers``), in execution order."""
        return [step for step in self.steps if step.module is not None]

    def with_pruned_blocks(self, pruned: Mapping[str, Iterable[Iterable[int]]]) -> Plan:
        """A plan whose nested layers lack the blocks ``pruned`` ({layer: [(out_group, in_group), ...]},
        0-based), recorded in :attr:`record` beside those pruned before.

        Raises:
            ValueError: naming a layer that is not nested or a block its mask does not hold.
        """
        nested = {step.name: step for step in self.nested_steps()}
        blocks = {name: [tuple(block) for block in dropped] for name, dropped in pruned.items()}
        steps = list(self.steps)
        for name, dropped in blocks.items():
            step = nested.get(name)
            if step is None:
                raise ValueError(f"pruned_blocks names {name!r}, which is not a nested layer of this RDN")
            layout = step.layer.layout
            mask = [list(row) for row in layout.mask]
            for out_group, in_group in dropped:
                if not (0 <= in_group <= out_group < self.num_groups and mask[out_group][in_group]):
                    raise ValueError(f"pruned_blocks of {name!r}: ({out_group}, {in_group}) is not a block of its mask")
                mask[out_group][in_group] = False
            layer = dataclasses.replace(step.layer, layout=make_layout(layout.in_splits, layout.out_splits, mask))
            steps[self.position(name)] = dataclasses.replace(step, layer=layer)
        recorded = {name: list(blocks) for name, blocks in self.record.pruned_blocks.items()}
        for name, dropped in blocks.items():
            recorded.setdefault(name, []).extend(dropped)
        record = self.record.replace(pruned_blocks=recorded)
        return dataclasses.replace(self, record=record, steps=tuple(steps))
