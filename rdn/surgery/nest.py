"""``nest``: pretrained base model → :class:`RussianDollNet` (DESIGN.md §4).

The surgery in order: the options (:class:`NestConfig`) with the model-dependent ones resolved to
module names → the graph analysis (:class:`~rdn.surgery.graph.SurgeryGraph`: roles, channel
spaces, what stays un-nested) → the selection pass (unit orders) → the record and its plan
(:func:`~rdn.surgery.build.make_plan`) → the network executing it, its modules made from the base
model's (:func:`~rdn.surgery.build.build_modules`) → the budget pass (an edited plan) → the
compensation pass (refitted weights).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rdn.models.profile import eval_mode, profile_model
from rdn.surgery import costs
from rdn.surgery.build import build_modules, make_plan
from rdn.surgery.calibration import calibration_batch, check_activations
from rdn.surgery.config import DEFAULT_ACTIVATION_BUDGET, DEFAULT_MAC_BUDGET, NestConfig
from rdn.surgery.coverage import CoverageWarning
from rdn.surgery.graph import SurgeryGraph
from rdn.surgery.network import RussianDollNet
from rdn.surgery.passes.budget import prune_blocks
from rdn.surgery.passes.compensate import compensate_dropped_connections
from rdn.surgery.passes.select import select_orders
from rdn.surgery.record import NestRecord
from rdn.surgery.search import (
    CandidateCosts,
    FeatureMapsOutOfReach,
    candidate_options,
    scoring_split,
    search_construction,
)

__all__ = ["nest"]


def _default_skip(model: nn.Module) -> list[str] | None:
    """Stem + first two blocks of an ``rdn.models`` classifier (``stem`` and ``blocks`` parts);
    ``None`` (layers at output stride <= 4) for any other model."""
    stem, blocks = getattr(model, "stem", None), getattr(model, "blocks", None)
    if not isinstance(stem, nn.Module) or not isinstance(blocks, nn.Sequential):
        return None
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(stem)], *(names[id(block)] for block in list(blocks)[:2])]


def _qualified_names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


def _module_name(model: nn.Module, item, what: str):
    """``item``'s qualified name in ``model`` when it is a module; anything else as it is (NestConfig checks it)."""
    if not isinstance(item, nn.Module):
        return item
    name = _qualified_names(model).get(id(item))
    if not name:
        raise ValueError(f"{what} {item!r} is not a sub-module (or qualified sub-module name) of the model")
    return name


def _module_names(model: nn.Module, skip):
    """``skip`` with its modules replaced by their qualified names (a sequence becomes a tuple)."""
    if isinstance(skip, Sequence) and not isinstance(skip, str):
        return tuple(_module_name(model, item, "skip entry") for item in skip)
    return skip


def _resolve_skip(model: nn.Module, skip: int | tuple[str, ...] | None) -> list[str] | int | None:
    """The checked ``NestConfig.skip`` for :class:`SurgeryGraph`: its default for ``rdn.models`` made explicit,
    names checked against the model."""
    if skip is None:
        return _default_skip(model)
    if isinstance(skip, int):
        return skip
    known = set(_qualified_names(model).values()) - {""}
    for name in skip:
        if name not in known:
            raise ValueError(f"skip entry {name!r} is not a sub-module (or qualified sub-module name) of the model")
    return list(skip)


def _resolve_depth_split(model: nn.Module, depth_split: int | str | None) -> str | None:
    """The qualified module name after which shallow exits branch off (an int: ``model.blocks[i]``)."""
    if depth_split is None:
        return None
    names = _qualified_names(model)
    if isinstance(depth_split, int):
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.Sequential):
            raise ValueError("an int depth_split indexes model.blocks (rdn.models layout); pass a module name instead")
        if not 0 <= depth_split < len(blocks) - 1:
            raise ValueError(
                f"depth_split must index a block before the last one (0..{len(blocks) - 2}), got {depth_split}"
            )
        return names[id(blocks[depth_split])]
    if not depth_split or depth_split not in names.values():
        raise ValueError(f"depth_split {depth_split!r} is not a sub-module (or qualified sub-module name) of the model")
    return depth_split


class _Surgery:
    """The surgery's steps for one model, shared by the candidates of the MAC budget's search."""

    def __init__(self, model: nn.Module, skip: list[str] | int | None, base: dict | None, example: Tensor) -> None:
        self.model, self.skip, self.base, self.example = model, skip, base, example
        # The selection depends on copy_fraction only through whether some channels go without copies
        # (passes/select.py: copies_first), so the search's candidates share two selections.
        self._selections: dict[tuple, tuple] = {}
        self._activations_checked: set[int] = set()  # id() of the batches the base model ran finite on

    @functools.cached_property
    def base_macs(self) -> int:
        """The base model's MACs per sample (measured once the graph analysis has checked the input's shape)."""
        return profile_model(self.model, self.example).macs

    def build(self, config: NestConfig, batch: Tensor, activation_budget: float | None = None) -> RussianDollNet:
        """Graph analysis → selection → plan → network for ``config`` (copy_fraction set), pruned to its
        MAC budget if it has one; not compensated. ``batch``: the calibration images (N, C, H, W).
        Raises FeatureMapsOutOfReach when N_K computes more than ``activation_budget`` × the base model's
        feature-map elements (before anything is built), BudgetOutOfReach when it cannot fit the MAC budget."""
        graph = SurgeryGraph(self.model, batch[:1], self.skip, config.k, config.mode, config.exact,
                             config.depth_split, config.copy_fraction, config.norms)  # fmt: skip
        key = (id(batch), config.copy_fraction < 1, config.select, config.seed)
        if key not in self._selections:
            # greedy checks the activations
            self._selections[key] = select_orders(graph, batch, config.select, config.seed)
            if config.select == "random" and config.mac_budget is not None:  # block energies need them finite
                check_activations(graph.graph_module, batch)
            if config.select == "greedy" or config.mac_budget is not None:
                self._activations_checked.add(id(batch))
        orders, select_ties = self._selections[key]
        record = NestRecord(
            config=config.replace(skip=tuple(graph.skipped_targets)),
            input_shape=tuple(batch.shape[1:]),
            orders=orders,
            pruned_blocks={},
            # where the calibration scores tied and the index decided (passes/select.py, passes/budget.py)
            ties={"select": select_ties, "mac_budget": {}},
            base=self.base,
        )
        plan = make_plan(graph, record)
        elements = costs.activation_ratio(plan, plan.num_subnets) if activation_budget is not None else None
        if elements is not None and elements > activation_budget:
            raise FeatureMapsOutOfReach(
                f"activation_budget={activation_budget} is out of reach: N_K computes {elements:.3f}x the base "
                f"model's feature-map elements with copy_fraction={config.copy_fraction}",
                elements,
            )
        net = RussianDollNet(plan, build_modules(plan, graph))
        if config.mac_budget is not None:
            pruning = prune_blocks(net, batch, config.mac_budget, self.base_macs)
            edited = net.plan.with_pruned_blocks(pruning.pruned)
            ties = {"select": select_ties, "mac_budget": pruning.ties}
            net.use_plan(dataclasses.replace(edited, record=edited.record.replace(ties=ties)))
        return net

    def compensate(self, net: RussianDollNet, batch: Tensor) -> None:
        """Refit ``net``'s copies that miss inputs (after pruning: the refit knows every block that is gone)."""
        compensate_dropped_connections(net, self.model, batch, seed=net.record.config.seed,
                                       base_checked=id(batch) in self._activations_checked)  # fmt: skip

    def measure(self, net: RussianDollNet) -> CandidateCosts:
        """What the budget's search weighs of a candidate besides its error."""
        plan = net.plan
        return CandidateCosts(costs.macs(plan, net.num_subnets) / self.base_macs,
                              costs.activation_ratio(plan, net.num_subnets), len(costs.void_groups(plan)))


def _search(surgery: _Surgery, config: NestConfig, batch: Tensor) -> RussianDollNet:
    """The candidate of the MAC budget's search (:mod:`rdn.surgery.search`) with the least logit error,
    its record holding the chosen options and every candidate's scores."""
    build_images, scoring_images = scoring_split(batch) if len(candidate_options(config)) > 1 else (batch, batch)

    def compensated(net: RussianDollNet) -> RussianDollNet:
        refitted = copy.deepcopy(net)
        surgery.compensate(refitted, build_images)
        return refitted

    @functools.cache
    def base_logits() -> Tensor:
        return surgery.model(scoring_images).float()

    net, chosen, candidates = search_construction(
        config,
        lambda options, activation_budget: surgery.build(options, build_images, activation_budget),
        compensated,
        scoring_images,
        base_logits,
        surgery.measure,
    )
    record = net.record
    record = record.replace(config=record.config.replace(compensate=chosen.compensate),
                            search=tuple(candidate.to_dict() for candidate in candidates))  # fmt: skip
    net.use_plan(dataclasses.replace(net.plan, record=record))
    return net


def nest(
    model: nn.Module,
    k: int = 4,
    mode: str = "expand",
    select: str = "greedy",
    calib: Tensor | object = None,
    skip=None,
    depth_split=None,
    seed: int = 0,
    exact: bool = False,
    copies: str = "latest",
    copy_fraction: float | None = None,
    mac_budget: float | None = DEFAULT_MAC_BUDGET,
    activation_budget: float | None = DEFAULT_ACTIVATION_BUDGET,
    compensate: bool | None = None,
    norms: str = "fixed",
    base: dict | None = None,
    *,
    config: NestConfig | None = None,
) -> RussianDollNet:
    """Turn a (pretrained) classifier into a Russian doll network.

    The options come either as keywords (``k``, ``mode``, ... below) or as one
    :class:`~rdn.surgery.config.NestConfig` (``config=``), which checks them; not both.

    Args:
        model: an ``nn.Module`` traceable by ``torch.fx`` whose output is the logits of an
            ``nn.Linear`` classifier (``rdn.models``, torchvision / timm-style CNNs).
        k: channel groups per nested layer; ``k`` must not exceed any nested tensor's channel
            units. Uneven channels: the remainder goes to the first groups (``split_channels``).
        mode: ``"expand"`` (K = 2k - 1 sub-networks, violating connections re-routed into new
            groups, see :mod:`rdn.surgery.spaces`) or ``"truncate"`` (K = k, violating blocks dropped).
        select: ``"greedy"`` (paper Algorithm 1 on the calibration activations) or ``"random"``
            (seeded by ``seed``).
        calib: calibration inputs, a floating tensor (N, C, H, W), N >= 1, with finite values, or a
            DataLoader / iterable of such batches (tensors or (input, target) pairs); used for shapes,
            costs, greedy selection, ``mac_budget`` and ``compensate``. Those three score channels and
            blocks with the base model's activations on it, so a node whose output is not finite is
            refused by name. Where the scores tie, the unit / block index decides; ``record.ties``
            records where (``{"select": {layout: [primary groups]}, "mac_budget": {layer: [output
            groups]}}``).
        skip: layers kept un-nested: ``None`` = the stem and the first two blocks (``rdn.models``
            layout) or, for other models, the layers at output stride <= 4 but at most the first
            quarter of the nestable layers (so a model for small inputs still nests the rest); an int
            n = the first n nestable layers (0: none); or a sequence of sub-modules / qualified module
            names.
        depth_split: depth-wise nesting (DESIGN.md §4.4): the block (index into ``model.blocks``, a
            sub-module or its qualified name) after which every sub-network gets a second, shallow
            exit through a light alignment block (1×1 conv → BN → ReLU → pool) into the shared
            classifier; exits double from K to 2K (:attr:`RussianDollNet.exits`).
        seed: seed of random selection.
        exact: expand mode only: keep every connection (a third copy at group K where needed), so
            N_K reproduces the base network exactly before fine-tuning, at about twice its MACs; it
            takes no ``mac_budget`` (the default budget is dropped). ``False`` (default): at most two
            copies, and the budget's search below.
        copies: what a channel copy holds: ``"latest"`` (default: a whole value recomputed from the
            inputs available at its group; with ``exact`` N_K is then exactly the base network,
            non-linearities included) or ``"sum"`` (partial sums that add up, the construction of
            DESIGN.md §4.2: exact only without non-linearities). See :mod:`rdn.surgery.spaces`.
        copy_fraction: expand mode with ``exact=False`` only (``None``, the default: chosen by the
            budget's search among 1, 0.75, 0.5 and 0.25; 1 without a budget): the share of every primary group's
            channel units that get a copy in an added group (rounded per group): those whose
            value loses the most energy to the inputs their primary cannot see (greedy select) or
            random ones (random select). The others keep only their primary, whose violating
            connections are dropped as in truncate mode. Fewer copies mean fewer channels in
            N_{k+1}..N_K: less work in every layer, not only the nested ones. 1: every channel.
        mac_budget: the first knob, expand mode without ``exact``: N_K does at most this many times
            the base model's MACs (default 1.2, near the paper's 1.11-1.16x). The surgery tries every
            ``copy_fraction`` and ``compensate`` left ``None``; for each, blocks of the added groups
            that carry the least of their outputs' energy on ``calib`` are dropped until N_K fits
            (sparse group dependencies, paper eq. 1; :mod:`rdn.surgery.passes.budget`; N_1..N_k are
            not touched), and the candidate whose N_K is closest to the base model's logits on a
            held-out quarter of ``calib`` is kept (:mod:`rdn.surgery.search`; ``record.search`` lists
            every candidate's MACs and error, ``record.config`` the chosen options). ``None``: no
            budget, every block kept.
        activation_budget: the search's second bound (default 1.1): N_K computes at most this many
            times the base model's feature-map elements (:func:`rdn.surgery.costs.activation_elements`).
            MACs miss the memory-bound layers (BN, activations, depthwise convs), whose work grows
            with the channels: a training step's time and memory follow this ratio more closely
            (``benchmarks/results/training_cost_cpu.md``). Only ``copy_fraction`` moves it, so the
            fractions whose N_K exceeds it are out of reach. ``None``: MACs only. The default is
            dropped where nothing is searched (``exact``, truncate, ``mac_budget=None``, a set
            ``copy_fraction``); another value there is an error.
        compensate: (``None``, the default: chosen by the budget's search; off without a budget)
            refit, on ``calib``, every output copy that misses some input channel (dropped
            or pruned connections) by least squares against the base layer's output, layer by
            layer (:mod:`rdn.surgery.passes.compensate`; ``copies="latest"`` only). Copies that read every
            input keep the base weights (with ``exact`` N_K stays the base network).
        norms: normalisations that couple channels (LayerNorm over the channels as in ConvNeXt,
            GroupNorm): ``"fixed"`` (default, as the paper) keeps them whole, so they and every layer
            writing what they read stay un-nested; ``"grouped"`` replaces each one on a nested tensor
            by a :class:`~rdn.nn.GroupedNorm` with statistics per channel group, so adding later
            groups never changes earlier ones. That changes the function (N_K is no longer exactly
            the base model): fine-tune afterwards.
        base: keyword arguments of ``rdn.models.create`` that rebuild ``model``'s architecture,
            stored in the record so ``RussianDollNet.from_config`` needs no model.
        config: the options as a :class:`NestConfig` (then leave the option keywords at their defaults).
    Returns:
        The RDN; :attr:`RussianDollNet.record` holds the options and what the surgery found,
        ``net.coverage()`` how much of the model is nested and why the rest is not.
    Warns:
        CoverageWarning: when less than half of the base model's MACs is in nested layers (the
            message names the causes and, where the skipped layers hold much, suggests ``skip=0``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    keywords = {"k": k, "mode": mode, "select": select, "skip": skip, "depth_split": depth_split, "seed": seed,
                "exact": exact, "copies": copies, "copy_fraction": copy_fraction, "mac_budget": mac_budget,
                "activation_budget": activation_budget, "compensate": compensate, "norms": norms}  # fmt: skip
    if config is None:
        # modules given for skip / depth_split are named first: a NestConfig holds names
        names = {"skip": _module_names(model, skip), "depth_split": _module_name(model, depth_split, "depth_split")}
        config = NestConfig(**keywords | names)
    elif not isinstance(config, NestConfig):
        raise TypeError(f"config must be a NestConfig, got {type(config).__name__}")
    else:
        given = {key: value for key, value in keywords.items() if value != getattr(NestConfig(), key)}
        if given:
            raise TypeError(f"nest() takes the options as config= or as keywords, not both; got config= and {given}")
    if calib is None:
        raise ValueError("calib is required: a calibration tensor (N, C, H, W) or DataLoader")
    if base is not None and not isinstance(base, dict):
        raise TypeError(f"base must be a dict of rdn.models.create arguments or None, got {type(base).__name__}")
    batch = calibration_batch(calib)
    skip = _resolve_skip(model, config.skip)
    depth_split = _resolve_depth_split(model, config.depth_split)
    config = config.replace(depth_split=depth_split)
    with eval_mode(model), torch.no_grad():
        surgery = _Surgery(model, skip, base, batch[:1])
        if config.mac_budget is None:
            config = config.resolved()
            net = surgery.build(config, batch)
            if config.compensate:
                surgery.compensate(net, batch)
        else:
            net = _search(surgery, config, batch)
    low = net.coverage().warning()
    if low is not None:
        warnings.warn(low, CoverageWarning, stacklevel=2)
    return net
