"""Budget pass: drop blocks of the added groups until N_K fits a MAC budget (sparse group dependencies).

Expand mode keeps every connection of the base model by re-routing the violating ones into the
k - 1 added groups (K = 2k - 1). With ``copies="latest"`` a copy in an added group recomputes its
channel from nearly every input, so N_K costs about twice the base model's MACs (1.4× with
``exact=False``). The paper's nested convolution (its eq. 1) lets group i + 1 read only a subset
q^i of the earlier groups, which is how its N_K stays near the base's cost (its Table 1:
1.11–1.16×). :func:`prune_blocks` chooses those subsets for a budget:

- only blocks of the added groups (output groups k..K-1, 0-based) are candidates, so N_1..N_k
  stay exactly what surgery made them;
- block (j, i) is scored by its share of output group j's energy on the calibration data,
  ‖W_ji ⊗ X_i‖² / Σ_i' ‖W_ji' ⊗ X_i'‖² (X: the unpruned N_K's activations), so scores compare
  across layers whatever their scale;
- blocks are dropped in increasing order of score per MAC saved until N_K fits; every output
  group keeps its highest-scoring block.

An output group whose blocks carry no energy at all on the calibration data (every score 0) keeps
its first block, chosen by index, not by the data: :func:`prune_blocks` reports those groups and
``nest`` records them in ``NestRecord.ties["mac_budget"]``. Non-finite energies are refused.

The pass returns its edit (:class:`Pruning`) and changes nothing: the costs it checks are those of
the edited plan (``plan.with_pruned_blocks``, :func:`rdn.surgery.costs.macs`), and
:func:`apply_pruned_blocks` makes a network execute it. The dropped blocks change N_{k+1}..N_K's
function; joint fine-tuning recovers it (measured in ``benchmarks/results/``). They are recorded
in ``NestRecord.pruned_blocks``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rdn.models.profile import run_with_forward_hooks
from rdn.nn import NestedConv2d, NestedLinear
from rdn.surgery import costs
from rdn.surgery.calibration import check_finite_calibration
from rdn.surgery.network import RussianDollNet

__all__ = ["BudgetOutOfReach", "Pruning", "prune_blocks", "apply_pruned_blocks"]


class BudgetOutOfReach(ValueError):
    """N_K cannot fit the MAC budget even with every droppable block of the added groups dropped."""


@dataclass(frozen=True)
class _Block:
    layer: str
    out_group: int
    in_group: int
    macs: int  # per sample
    score: float


def _block_energies(layer: NestedConv2d | NestedLinear, x: Tensor, rows: range) -> dict[tuple[int, int], float]:
    """Σ over batch and pixels of (W_ji ⊗ X_i)² for every block (j, i) of the mask with j in ``rows``."""
    energies = {}
    for j in rows:
        out_slice = slice(layer.layout.out_offsets[j], layer.layout.out_offsets[j + 1])
        for i in range(j + 1):
            if not layer.layout.mask[j][i]:
                continue
            in_slice = slice(layer.layout.in_offsets[i], layer.layout.in_offsets[i + 1])
            block_weight = layer.weight[out_slice, in_slice]  # a block of the mask: its stored weights
            x_i = x[:, in_slice]
            if isinstance(layer, NestedConv2d):
                y = F.conv2d(x_i, block_weight, None, layer.stride, layer.padding, layer.dilation)
            else:
                y = F.linear(x_i, block_weight)
            energies[(j, i)] = float(y.double().pow(2).sum())
    return energies


@torch.no_grad()
def _candidates(net: RussianDollNet, calib: Tensor, first_group: int) -> tuple[list[_Block], dict[str, list[int]]]:
    """Every block of an added group, scored on one N_K forward of ``calib``, and the output groups
    whose blocks carry no energy at all ({layer: [out_group, ...]}: all their scores are 0)."""
    blocks: list[_Block] = []
    unscored: dict[str, list[int]] = {}

    def record(name: str):
        def hook(layer, args, output):
            rows = range(first_group, layer.num_groups)
            energies = _block_energies(layer, args[0], rows)
            if not all(math.isfinite(energy) for energy in energies.values()):
                raise ValueError(
                    f"mac_budget: the block energies of nested layer {name} on calib are not finite (its input "
                    "or weights hold NaN or inf)"
                )
            kernel = math.prod(layer.kernel_size) if isinstance(layer, NestedConv2d) else 1
            pixels = math.prod(output.shape[2:])  # per sample, as rdn.surgery.costs counts them
            for j in rows:
                row = {i: energy for (jj, i), energy in energies.items() if jj == j}
                total = sum(row.values())
                if row and total == 0:
                    unscored.setdefault(name, []).append(j)
                for i, energy in row.items():
                    macs = layer.out_splits[j] * layer.in_splits[i] * kernel * pixels
                    share = energy / total if total > 0 else 0.0
                    blocks.append(_Block(name, j, i, macs, share))

        return hook

    hooks = [(layer, record(name)) for name, layer in net.nested_layers().items()]
    run_with_forward_hooks(net, calib, hooks)
    return blocks, unscored


def _kept_per_row(blocks: list[_Block]) -> set[_Block]:
    """The highest-scoring block of every (layer, output group): never dropped (the first one when
    every score of the group is 0)."""
    best: dict[tuple[str, int], _Block] = {}
    for block in blocks:
        key = (block.layer, block.out_group)
        if key not in best or block.score > best[key].score:
            best[key] = block
    return set(best.values())


class Pruning(NamedTuple):
    """:func:`prune_blocks`' result."""

    pruned: dict[str, list[list[int]]]  # {layer: [[out_group, in_group], ...]}, as apply_pruned_blocks takes it
    ties: dict[str, list[int]]  # {layer: [out_group, ...]} with no energy on calib: first block kept by index


def prune_blocks(net: RussianDollNet, calib: Tensor, mac_budget: float, base_macs: int) -> Pruning:
    """The blocks of the added groups to drop so that N_K does at most ``mac_budget × base_macs`` MACs.

    Args:
        net: an RDN made by ``nest(..., mode="expand")``; run once on ``calib``, not changed
            (:func:`apply_pruned_blocks` applies the result).
        calib: calibration inputs (N, ...) of the RDN's input shape, finite, N >= 1.
        mac_budget: N_K's MACs over the base model's at most (module docstring).
        base_macs: the base model's MACs per sample.
    Returns:
        The blocks to drop (0-based groups) and the output groups whose blocks carry no energy on
        ``calib`` (:class:`Pruning`); nothing when N_K fits already.
    Raises:
        BudgetOutOfReach: when dropping every candidate still leaves N_K above the budget.
        ValueError: when ``calib`` or the block energies are not finite.
    """
    plan = net.plan
    full = plan.num_subnets
    max_macs = math.floor(mac_budget * base_macs)
    macs = costs.macs(plan, full)
    if macs <= max_macs:
        return Pruning({}, {})
    options = plan.record.config
    if options.mode != "expand":
        raise ValueError("only expand mode has added groups whose blocks can be dropped")
    check_finite_calibration(calib)
    blocks, unscored = _candidates(net, calib, first_group=options.k)
    kept = _kept_per_row(blocks)
    droppable = sorted((b for b in blocks if b not in kept), key=lambda b: (b.score / max(b.macs, 1), -b.macs))
    floor = macs - sum(b.macs for b in droppable)
    if floor > max_macs:
        exact = options.exact
        hint = "; exact=True gives every channel a copy in the last group, exact=False does not" if exact else ""
        raise BudgetOutOfReach(
            f"mac_budget={mac_budget} is out of reach: with every block of the added groups dropped but one per "
            f"group, N_K still does {floor / base_macs:.3f}× the base model's MACs (blocks drop, channels stay; "
            f"N_1..N_k are never pruned){hint}"
        )
    pruned: dict[str, list[list[int]]] = {}
    for block in droppable:
        if macs <= max_macs:
            break
        pruned.setdefault(block.layer, []).append([block.out_group, block.in_group])
        macs -= block.macs
    actual = costs.macs(plan.with_pruned_blocks(pruned), full)
    if actual != macs:
        raise AssertionError(f"block MACs ({macs}) disagree with the pruned plan's ({actual})")
    return Pruning(pruned, unscored)


def apply_pruned_blocks(net: RussianDollNet, pruned: dict[str, list[list[int]]]) -> None:
    """Make ``net`` execute its plan without the blocks ``pruned`` ({layer: [[out_group, in_group], ...]}):
    they leave the nested layers' masks (their weights are zeroed) and join ``net.record.pruned_blocks``."""
    net.use_plan(net.plan.with_pruned_blocks(pruned))
