"""``nest``: pretrained base model → :class:`RussianDollNet` (DESIGN.md §4)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rdn.surgery.budget import apply_pruned_blocks, prune_blocks
from rdn.surgery.compensate import compensate_dropped_connections
from rdn.surgery.graph import SurgeryGraph
from rdn.surgery.network import RussianDollNet
from rdn.surgery.select import calibration_batch, check_activations, definers, eval_mode, select_orders

__all__ = ["nest"]

MODES = ("expand", "truncate")
COPIES = ("sum", "latest")
SELECTIONS = ("greedy", "random")
CONFIG_VERSION = 1
# Keys added to version 1 after it was first written: configs without them mean these values.
CONFIG_DEFAULTS = {
    "mac_budget": None,
    "pruned_blocks": {},
    "copy_fraction": 1.0,
    "compensate": False,
    "ties": None,  # not recorded
}


def _default_skip(model: nn.Module) -> list[str] | None:
    """Stem + first two blocks of an ``rdn.models`` classifier (``stem`` and ``blocks`` parts);
    ``None`` (layers at output stride <= 4) for any other model."""
    stem, blocks = getattr(model, "stem", None), getattr(model, "blocks", None)
    if not isinstance(stem, nn.Module) or not isinstance(blocks, nn.Sequential):
        return None
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(stem)], *(names[id(block)] for block in list(blocks)[:2])]


def _check_skip(model: nn.Module, skip) -> list[str] | int | None:
    if skip is None:
        return _default_skip(model)
    if isinstance(skip, bool):
        raise TypeError(f"skip must be an int, a sequence of module names / modules, or None, got {skip!r}")
    if isinstance(skip, int):
        if skip < 0:
            raise ValueError(f"skip (number of leading nestable layers kept un-nested) must be >= 0, got {skip}")
        return skip
    if isinstance(skip, (str, nn.Module)) or not isinstance(skip, Sequence):
        raise TypeError(
            f"skip must be an int, a sequence of module names / modules, or None, got {type(skip).__name__}"
        )
    names = {id(module): name for name, module in model.named_modules()}
    known = set(names.values())
    resolved = []
    for item in skip:
        name = names.get(id(item)) if isinstance(item, nn.Module) else item
        if not isinstance(name, str) or name not in known or name == "":
            raise ValueError(f"skip entry {item!r} is not a sub-module (or qualified sub-module name) of the model")
        resolved.append(name)
    return resolved


def _check_depth_split(model: nn.Module, depth_split) -> str | None:
    """The qualified module name after which shallow exits branch off (an int: ``model.blocks[i]``)."""
    if depth_split is None:
        return None
    names = {id(module): name for name, module in model.named_modules()}
    if isinstance(depth_split, bool) or not isinstance(depth_split, (int, str, nn.Module)):
        raise TypeError(f"depth_split must be a block index, a module or a module name, got {depth_split!r}")
    if isinstance(depth_split, int):
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.Sequential):
            raise ValueError("an int depth_split indexes model.blocks (rdn.models layout); pass a module name instead")
        if not 0 <= depth_split < len(blocks) - 1:
            raise ValueError(
                f"depth_split must index a block before the last one (0..{len(blocks) - 2}), got {depth_split}"
            )
        return names[id(blocks[depth_split])]
    name = names.get(id(depth_split)) if isinstance(depth_split, nn.Module) else depth_split
    if not name or name not in names.values():
        raise ValueError(f"depth_split {depth_split!r} is not a sub-module (or qualified sub-module name) of the model")
    return name


def _check_mac_budget(mac_budget, mode: str) -> None:
    if mac_budget is None:
        return
    if isinstance(mac_budget, bool) or not isinstance(mac_budget, (int, float)) or not math.isfinite(mac_budget):
        raise TypeError(f"mac_budget must be a finite number (N_K's MACs / the base's) or None, got {mac_budget!r}")
    if mac_budget <= 0:
        raise ValueError(f"mac_budget (N_K's MACs / the base model's) must be > 0, got {mac_budget}")
    if mode != "expand":
        raise ValueError(f"mac_budget drops blocks of the groups expand mode adds; mode={mode!r} has none")


def _check_copy_fraction(copy_fraction, mode: str, exact: bool) -> None:
    if isinstance(copy_fraction, bool) or not isinstance(copy_fraction, (int, float)):
        raise TypeError(f"copy_fraction must be a number in [0, 1], got {copy_fraction!r}")
    if not 0 <= copy_fraction <= 1:
        raise ValueError(f"copy_fraction (share of each group's channels that get copies) must be in [0, 1], "
                         f"got {copy_fraction}")  # fmt: skip
    if copy_fraction < 1 and (mode != "expand" or exact):
        raise ValueError(
            f"copy_fraction < 1 drops the connections of the channels without copies: it needs mode='expand' and "
            f"exact=False, got mode={mode!r}, exact={exact}"
        )


def _check_settings(k, mode, select, exact, seed, copies) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int >= 1, got {k!r}")
    if k < 1:
        raise ValueError(f"k (number of channel groups per layer) must be >= 1, got {k}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if select not in SELECTIONS:
        raise ValueError(f"select must be one of {SELECTIONS}, got {select!r}")
    if copies not in COPIES:
        raise ValueError(f"copies must be one of {COPIES}, got {copies!r}")
    if not isinstance(exact, bool):
        raise TypeError(f"exact must be a bool, got {exact!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")


def nest(
    model: nn.Module,
    k: int = 4,
    mode: str = "expand",
    select: str = "greedy",
    calib: Tensor | object = None,
    skip=None,
    depth_split=None,
    seed: int = 0,
    exact: bool = True,
    copies: str = "latest",
    copy_fraction: float = 1.0,
    mac_budget: float | None = None,
    compensate: bool = False,
    base: dict | None = None,
) -> RussianDollNet:
    """Turn a (pretrained) classifier into a Russian doll network.

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
            refused by name. Where the scores tie, the unit / block index decides; ``rdn_config["ties"]``
            records where (``{"select": {layout: [primary groups]}, "mac_budget": {layer: [output
            groups]}}``).
        skip: layers kept un-nested: ``None`` = the stem and the first two blocks (``rdn.models``
            layout) or, for other models, every layer at output stride <= 4; an int n = the first n
            nestable layers; or a sequence of sub-modules / qualified module names.
        depth_split: depth-wise nesting (DESIGN.md §4.4): the block (index into ``model.blocks``, a
            sub-module or its qualified name) after which every sub-network gets a second, shallow
            exit through a light alignment block (1×1 conv → BN → ReLU → pool) into the shared
            classifier; exits double from K to 2K (:attr:`RussianDollNet.exits`).
        seed: seed of random selection.
        exact: expand mode only: keep every connection (a third copy at group K where needed), so
            N_K reproduces the base network's linear maps exactly; ``False``: at most two copies.
        copies: what a channel copy holds: ``"latest"`` (default: a whole value recomputed from the
            inputs available at its group; with ``exact`` N_K is then exactly the base network,
            non-linearities included) or ``"sum"`` (partial sums that add up, the construction of
            DESIGN.md §4.2: exact only without non-linearities). See :mod:`rdn.surgery.spaces`.
        copy_fraction: expand mode with ``exact=False`` only: the share of every primary group's
            channel units that get a copy in an added group (rounded per group): those whose
            value loses the most energy to the inputs their primary cannot see (greedy select) or
            random ones (random select). The others keep only their primary, whose violating
            connections are dropped as in truncate mode. Fewer copies mean fewer channels in
            N_{k+1}..N_K: less work in every layer, not only the nested ones. 1: every channel.
        mac_budget: expand mode only: at most this many times the base model's MACs for N_K
            (e.g. 1.15). Blocks of the added groups that carry the least of their outputs' energy
            on ``calib`` are dropped until N_K fits (sparse group dependencies, paper eq. 1; see
            :mod:`rdn.surgery.budget`); N_1..N_k are not touched. ``None``: keep every block.
        compensate: refit, on ``calib``, every output copy that misses some input channel (dropped
            or pruned connections) by least squares against the base layer's output, layer by
            layer (:mod:`rdn.surgery.compensate`; ``copies="latest"`` only). Copies that read every
            input keep the base weights (with ``exact`` N_K stays the base network).
        base: keyword arguments of ``rdn.models.create`` that rebuild ``model``'s architecture,
            stored in ``rdn_config`` so ``RussianDollNet.from_config`` needs no model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_settings(k, mode, select, exact, seed, copies)
    _check_mac_budget(mac_budget, mode)
    _check_copy_fraction(copy_fraction, mode, exact)
    if not isinstance(compensate, bool):
        raise TypeError(f"compensate must be a bool, got {compensate!r}")
    if compensate and copies != "latest":
        raise ValueError("compensate=True needs copies='latest' (every copy a whole value)")
    if calib is None:
        raise ValueError("calib is required: a calibration tensor (N, C, H, W) or DataLoader")
    if base is not None and not isinstance(base, dict):
        raise TypeError(f"base must be a dict of rdn.models.create arguments or None, got {type(base).__name__}")
    batch = calibration_batch(calib)
    skip = _check_skip(model, skip)
    depth_split = _check_depth_split(model, depth_split)
    with eval_mode(model), torch.no_grad():
        graph = SurgeryGraph(model, batch[:1], skip, k, mode, exact, depth_split, copy_fraction)
        orders, select_ties = select_orders(graph, batch, select, seed)  # greedy checks the activations
        if select == "random" and mac_budget is not None:  # block energies need them finite too
            check_activations(graph.graph_module, batch)
    config = {
        "version": CONFIG_VERSION,
        "k": k,
        "mode": mode,
        "exact": exact,
        "copies": copies,
        "select": select,
        "seed": seed,
        "skip": list(graph.skipped_targets),
        "input_shape": list(batch.shape[1:]),
        "orders": {space: list(order) for space, order in orders.items()},
        "depth_split": depth_split,
        "base": base,
        "copy_fraction": copy_fraction,
        "mac_budget": mac_budget,
        "pruned_blocks": {},
        "compensate": compensate,
        # where the calibration scores tied and the index decided (select.py, budget.py)
        "ties": {"select": select_ties, "mac_budget": {}},
    }
    net = RussianDollNet(graph, orders, config)
    if mac_budget is not None:
        from rdn.models.profile import profile_model

        with eval_mode(model):  # profile_model puts every module back in the model's mode, not its own
            base_macs = profile_model(model, batch[:1]).macs
        with torch.no_grad():
            pruning = prune_blocks(net, batch, mac_budget, base_macs)
        net.rdn_config["pruned_blocks"] = pruning.pruned
        net.rdn_config["ties"]["mac_budget"] = pruning.ties
    if compensate:  # after pruning: the refit knows every block that is gone
        compensate_dropped_connections(net, model, batch, seed=seed)
    return net


def with_config_defaults(config: dict) -> dict:
    """``config`` with the keys added since version 1 was first written filled in (see ``CONFIG_DEFAULTS``)."""
    return {**CONFIG_DEFAULTS, **config}


def build_from_config(config: dict, model: nn.Module | None) -> RussianDollNet:
    """Rebuild an RDN structure from its ``rdn_config`` (see :meth:`RussianDollNet.from_config`)."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be the dict of RussianDollNet.rdn_config, got {type(config).__name__}")
    missing = {"version", "k", "mode", "exact", "copies", "skip", "input_shape", "orders"} - set(config)
    if missing:
        raise ValueError(f"config misses the keys {sorted(missing)}; pass RussianDollNet.rdn_config")
    if config["version"] != CONFIG_VERSION:
        raise ValueError(f"config version {config['version']} is not supported (expected {CONFIG_VERSION})")
    config = with_config_defaults(config)
    if model is None:
        if not config.get("base"):
            raise ValueError(
                "config has no 'base' model arguments: pass model= (a base model of the same architecture)"
            )
        from rdn.models import create

        model = create(**config["base"])
    _check_settings(
        config["k"],
        config["mode"],
        config.get("select", "greedy"),
        config["exact"],
        config.get("seed", 0),
        config["copies"],
    )
    _check_copy_fraction(config["copy_fraction"], config["mode"], config["exact"])
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = torch.zeros((1, *config["input_shape"]), dtype=dtype, device=device)
    with eval_mode(model), torch.no_grad():
        graph = SurgeryGraph(
            model,
            example,
            list(config["skip"]),
            config["k"],
            config["mode"],
            config["exact"],
            config.get("depth_split"),
            config["copy_fraction"],
        )
    expected = set(definers(graph).values())
    mismatched = set(config["orders"]) != expected or any(
        len(order) != graph.unit_counts[layout] for layout, order in config["orders"].items()
    )
    if mismatched:
        raise ValueError(
            f"config orders {[(name, len(order)) for name, order in config['orders'].items()]} (layout, units) do "
            f"not match this model's {[(name, graph.unit_counts[name]) for name in sorted(expected)]}; "
            "the model's architecture differs from the one the config was made from"
        )
    net = RussianDollNet(graph, config["orders"], config)
    apply_pruned_blocks(net, config["pruned_blocks"])
    return net
