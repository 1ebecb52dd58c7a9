"""Compensation pass: least-squares refit of the connections a nested layer's copies cannot read.

Surgery gives every output copy of channel o the base weights W[o, c] of the input channels its
group can see and drops the rest (``rdn.surgery.spaces``): the primaries of expand mode, every
copy of a channel without copies (``copy_fraction < 1``), the blocks a MAC budget prunes. Such a
copy computes only part of y_o, and the error compounds through the layers: with a quarter of the
copies a Fashion-MNIST MobileNetV2's N_K starts at chance before fine-tuning.

:func:`compensate_dropped_connections` refits those copies, layer after layer in graph order, the way channel pruning
reconstructs a pruned layer (He et al., 2017): on the calibration data, the weights of an
incomplete output copy over *every* input column its group's blocks hold are the ridge
regression of the base layer's output y_o on the RDN's own inputs there (so upstream errors are
corrected too), shrunk towards surgery's weights:

    w = argmin ‖T − Φ w‖² + λ ‖w − w₀‖²,   λ = shrinkage × mean diagonal of ΦᵀΦ

(Φ: centred input patches at sampled output pixels; T: the centred base output). The intercept
goes into the layer's bias when it has one; without a bias (conv → BN, the usual CNN) it goes into
the running mean of the BatchNorm that reads the layer (μ ← μ − intercept for the refitted
channels), so the refit is whole in eval mode, before any fine-tuning too. (A layer without a bias
and without such a BN loses its intercept: fine-tuning's batch statistics absorb it.) Copies that
read every input channel are left untouched, so with ``exact=True`` N_K stays exactly the base
network. Reading more columns than surgery did costs nothing: the kernels compute whole blocks of
the mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdn.models.profile import run_with_forward_hooks
from rdn.nn import NestedLinear
from rdn.surgery.calibration import check_activations, check_finite_calibration
from rdn.surgery.network import RussianDollNet
from rdn.surgery.plan import Step
from rdn.surgery.spaces import connections

__all__ = ["compensate_dropped_connections"]


def _patches(layer: nn.Module, x: Tensor) -> Tensor:
    """(N, features, positions): the inputs each output position reads (channel-major features)."""
    if isinstance(layer, (nn.Linear, NestedLinear)):
        return x.unsqueeze(-1)
    return F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)


def _sample(values: Tensor, index: Tensor) -> Tensor:
    """(N, features, positions) → (len(index), features) at flat (sample, position) indices."""
    return values.permute(0, 2, 1).reshape(-1, values.shape[1])[index.to(values.device)]


def _incomplete_rows(step: Step, copies: str) -> Tensor:
    """(len(out),) bool: output copies of nested ``step`` that miss some input channel (dropped or pruned
    connections)."""
    in_space, out_space = step.input_space, step.space
    reads = connections(in_space, out_space, copies)
    mask = torch.tensor(step.layer.layout.mask, dtype=torch.bool)
    in_groups, out_groups = in_space.group, out_space.group
    reads &= mask[out_groups][:, in_groups]
    seen = torch.zeros(len(out_space), in_space.channels, dtype=torch.bool)
    rows, columns = reads.nonzero(as_tuple=True)
    seen[rows, in_space.source[columns]] = True
    return ~seen.all(1)


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _reading_batch_norm(net: RussianDollNet, name: str) -> nn.Module | None:
    """The BatchNorm (with running statistics) that reads nested layer ``name``'s output directly, if any."""
    for step in net.plan.steps:
        inputs = step.node.all_input_nodes
        if len(inputs) == 1 and inputs[0].name == name and step.node.op == "call_module":
            module = net.layers[step.name] if step.name in net.layers else None
            if isinstance(module, _BATCH_NORMS) and module.running_mean is not None:
                return module
    return None


@torch.no_grad()
def _refit(layer: nn.Module, phi: Tensor, target: Tensor, rows: Tensor, base_bias: Tensor | None,
           out_space, in_space, shrinkage: float, norm: nn.Module | None = None) -> None:  # fmt: skip
    """Refit ``rows`` of ``layer`` (module docstring); phi (P, len(in)·kernel), target (P, channels);
    ``norm``: the BatchNorm reading a bias-free layer, whose running mean takes the intercept."""
    device = phi.device
    kernel = phi.shape[1] // len(in_space)
    weight = layer.weight.view(layer.weight.shape[0], -1)
    rows, out_groups, sources = rows.to(device), out_space.group.to(device), out_space.source.to(device)
    for j in range(layer.num_groups):
        group_rows = rows & (out_groups == j)
        if not group_rows.any():
            continue
        visible_groups = torch.tensor(layer.layout.mask[j], dtype=torch.bool)  # False above the diagonal
        columns = visible_groups[in_space.group].repeat_interleave(kernel).to(device)
        features = phi[:, columns]
        mean = features.mean(0)
        centred = features - mean
        gram = centred.T @ centred
        penalty = shrinkage * gram.diagonal().mean().clamp_min(1e-12)
        y = target[:, sources[group_rows]]
        y_mean = y.mean(0)
        start = weight[group_rows][:, columns].double()
        system = gram + penalty * torch.eye(len(gram), dtype=gram.dtype, device=device)
        fitted = torch.linalg.solve(system, centred.T @ (y - y_mean) + penalty * start.T).T
        new_rows = torch.zeros(int(group_rows.sum()), weight.shape[1], dtype=weight.dtype, device=device)
        new_rows[:, columns] = fitted.to(weight.dtype)
        weight[group_rows] = new_rows
        offset = 0 if base_bias is None else base_bias[sources[group_rows]].double()
        intercept = y_mean - fitted @ mean + offset
        if layer.bias is not None:
            layer.bias[group_rows] = intercept.to(layer.bias.dtype)
        elif norm is not None:  # (y + b - μ) / σ = (y - (μ - b)) / σ
            norm.running_mean[group_rows.to(norm.running_mean.device)] -= intercept.to(norm.running_mean.dtype)


@torch.no_grad()
def compensate_dropped_connections(
    net: RussianDollNet,
    base_model: nn.Module,
    calib: Tensor,
    shrinkage: float = 0.1,
    max_positions: int = 16384,
    seed: int = 0,
    base_checked: bool = False,
) -> int:
    """Refit the incomplete output copies of every nested layer of ``net`` (module docstring), in place.

    Args:
        net: an RDN made from ``base_model`` with ``copies="latest"`` (every copy a whole value).
        base_model: the base network (run once on ``calib`` for the targets).
        calib: calibration inputs (N, ...) of the RDN's input shape, finite, N >= 1; the base model's
            activations on them must be finite too (ValueError naming the node otherwise).
        shrinkage: ridge strength towards surgery's weights, relative to the mean input energy.
        max_positions: calibration (sample, pixel) pairs per layer, drawn at random beyond that.
        seed: the draw of those pairs.
        base_checked: the caller has checked ``calib`` and the base model's activations on it already
            (``rdn.nest``'s surgery does, before it compensates a candidate); skips that second run.
    Returns:
        The number of output copies refitted.
    """
    if net.record.config.copies != "latest":
        raise ValueError("compensation needs copies='latest' (every copy a whole value)")
    if shrinkage <= 0 or not math.isfinite(shrinkage):
        raise ValueError(f"shrinkage must be a positive number, got {shrinkage}")
    if not base_checked:
        check_finite_calibration(calib)
        check_activations(base_model, calib)  # the targets; a NaN would make every refit NaN
    generator = torch.Generator().manual_seed(seed)
    targets: dict[str, tuple[Tensor, Tensor]] = {}
    incomplete = {}  # nested layer name → its incomplete output copies
    for step in net.plan.nested_steps():
        name, rows = step.name, _incomplete_rows(step, net.record.config.copies)
        if rows.any():
            incomplete[name] = rows

    def record(name: str):
        def hook(module, args, output):
            values = output.unsqueeze(-1) if output.dim() == 2 else output.flatten(2)
            if module.bias is not None:
                values = values - module.bias.view(1, -1, 1)
            count = values.shape[0] * values.shape[2]
            index = torch.randperm(count, generator=generator)[:max_positions].sort().values
            targets[name] = (index, _sample(values, index).double())

        return hook

    # A nested layer's graph node calls the base model's module it replaces.
    base_modules = {name: base_model.get_submodule(net.base_module_name(name)) for name in incomplete}
    run_with_forward_hooks(base_model, calib, [(base_modules[name], record(name)) for name in incomplete])

    def refit(name: str):
        def hook(module, args, kwargs, output):
            in_space, out_space = net.nested_spaces(name)
            index, target = targets[name]
            phi = _sample(_patches(module, args[0]), index).double()
            if not torch.isfinite(phi).all():  # the RDN's own activations (the base's were checked)
                raise ValueError(f"compensate: the input of nested layer {name} is not finite on calib (NaN or inf)")
            _refit(module, phi, target, incomplete[name], base_modules[name].bias, out_space, in_space, shrinkage,
                   norms[name])  # fmt: skip
            return module.forward(*args, **kwargs)  # the refitted layer's output feeds the next layers

        return hook

    norms = {name: None if net.layers[name].bias is not None else _reading_batch_norm(net, name) for name in incomplete}
    run_with_forward_hooks(net, calib, [(net.layers[name], refit(name)) for name in incomplete], with_kwargs=True)
    return sum(int(rows.sum()) for rows in incomplete.values())
