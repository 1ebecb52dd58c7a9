"""Calibration data for the surgery: one checked batch, and runs that refuse non-finite activations.

The selection, the MAC budget and the compensation score channels and blocks with activations on
the calibration images (energies): NaN scores would sort anywhere and empty data would score every
unit 0, so the data and every activation it gives must be finite. :func:`calibration_batch` checks
the data, :func:`check_activations` (and :class:`FiniteRun`, which the greedy selection extends)
names the first node whose output is not.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from rdn.models.profile import eval_mode
from rdn.surgery.graph import describe_node, trace

__all__ = ["CALIB_EXPECTED", "FiniteRun", "calibration_batch", "check_activations", "check_finite_calibration"]

CALIB_EXPECTED = (
    "calib must be a non-empty floating-point tensor (N, C, H, W) with N >= 1 and finite values, or a "
    "DataLoader / iterable of such batches"
)


def check_finite_calibration(batch: Tensor) -> None:
    """Raise ValueError naming ``calib`` when ``batch`` (N, ...) has no sample or a NaN / inf value."""
    if batch.shape[0] == 0:
        raise ValueError(f"calib holds no sample (shape {tuple(batch.shape)}): {CALIB_EXPECTED}")
    finite = torch.isfinite(batch)
    if not finite.all():
        bad = ~finite.flatten(1).all(1)
        samples = bad.nonzero().flatten().tolist()
        listed = f"{samples[:8]}{'...' if len(samples) > 8 else ''}"
        raise ValueError(
            f"calib holds {int((~finite).sum())} non-finite value(s) (NaN or inf) in sample(s) {listed}: "
            f"{CALIB_EXPECTED}"
        )


def calibration_batch(calib) -> Tensor:
    """One tensor (N, ...) from a tensor or an iterable of batches (tensors or (input, target) pairs),
    checked non-empty and finite (:data:`CALIB_EXPECTED`)."""
    if isinstance(calib, Tensor):
        batches = [calib]
    elif isinstance(calib, Iterable) and not isinstance(calib, (str, bytes)):
        batches = [batch[0] if isinstance(batch, (tuple, list)) else batch for batch in calib]
    else:
        raise TypeError(f"{CALIB_EXPECTED}; got {type(calib).__name__}")
    if not batches:
        raise ValueError(f"calib is empty (no batch): {CALIB_EXPECTED}")
    for batch in batches:
        if not isinstance(batch, Tensor) or not batch.is_floating_point():
            got = f"{batch.dtype} of shape {tuple(batch.shape)}" if isinstance(batch, Tensor) else type(batch).__name__
            raise TypeError(f"calib batches must be floating tensors (N, C, H, W), got {got}")
        if batch.dim() < 2:
            raise ValueError(f"{CALIB_EXPECTED}; got shape {tuple(batch.shape)}")
    shapes = {tuple(batch.shape[1:]) for batch in batches}
    if len(shapes) != 1:
        raise ValueError(f"calib batches must share one sample shape, got {sorted(shapes)}")
    batch = torch.cat(batches) if len(batches) > 1 else batches[0]
    check_finite_calibration(batch)
    return batch


class FiniteRun(fx.Interpreter):
    """Runs a traced model and refuses the first node whose output is not finite.

    Its inputs were finite (checked before), so that node is where the NaN / inf comes from.
    """

    def __init__(self, graph_module: fx.GraphModule) -> None:
        super().__init__(graph_module)
        self.named_modules = dict(graph_module.named_modules())

    def run_node(self, node: fx.Node) -> Any:
        result = super().run_node(node)
        if isinstance(result, Tensor) and result.is_floating_point() and not torch.isfinite(result).all():
            raise ValueError(self._non_finite_message(node))
        return result

    def _non_finite_message(self, node: fx.Node) -> str:
        module = self.named_modules.get(node.target) if node.op == "call_module" else None
        tensors = [] if module is None else [*module.named_parameters(), *module.named_buffers()]
        broken = [name for name, t in tensors if t.is_floating_point() and not torch.isfinite(t).all()]
        cause = f"its {', '.join(broken)} holds NaN or inf" if broken else "it overflows or divides by zero"
        return (
            f"calib gives non-finite values (NaN or inf) at {describe_node(node, self.named_modules)}, whose "
            f"inputs are finite: {cause}. Surgery scores channels and blocks with these activations "
            "(greedy select, mac_budget, compensate) and needs them finite"
        )


@torch.no_grad()
def check_activations(model: nn.Module, calib: Tensor) -> None:
    """Run ``model`` (a module, traced here, or its ``fx.GraphModule``) on ``calib`` in eval mode;
    ValueError naming the first node whose output is not finite."""
    graph_module = model if isinstance(model, fx.GraphModule) else trace(model)
    with eval_mode(graph_module):
        FiniteRun(graph_module).run(calib)
