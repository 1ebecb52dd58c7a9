"""The README table of surgery: costs of every sub-network and N_K's error before fine-tuning.

``python -m rdn.surgery.report`` prints markdown. For every base model (ImageNet variants,
random-initialised except EfficientNet-Lite0, which loads its real ImageNet weights when the
weights package is installed):

- params and MACs of the base model and of N_1..N_K of its RDN (k = 4, expand), and the share of
  the base model's MACs in nested layers (:mod:`rdn.surgery.coverage`; the rest is the skipped stem
  and first blocks);
- random-initialised models first get their BN statistics from the calibration images (one
  train-mode pass with cumulative averaging): without it their activations shrink layer after
  layer (logits ~1e-8) and every relative error is noise;
- the relative logit error ``‖logits(N_s) − logits(base)‖ / ‖logits(base)‖`` of N_1 and N_K
  before fine-tuning, for expand (``copies="latest"`` and DESIGN's ``"sum"``) and truncate,
  with greedy and random selection, on random calibration / evaluation images.

MACs follow ``rdn.models.profile`` (conv and linear layers only), per image.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rdn.models import create
from rdn.models.profile import count_params, profile_model
from rdn.surgery.nest import nest

__all__ = ["SurgeryRow", "estimate_batch_norm", "surgery_rows", "surgery_report", "main"]

MODELS = ("mobilenet_v2", "mobilenext", "efficientnet_lite0", "resnext_small", "resnext50_32x4d")
# (mode, copies, exact) variants whose errors are reported.
VARIANTS = (
    ("expand", "latest", True),
    ("expand", "sum", True),
    ("expand", "latest", False),
    ("truncate", "latest", True),
)
PAPER_MOBILENEXT = (317e6, 369e6)  # paper Table 1: MobileNeXt-1.0 → RDN-MobileNeXt-1.0 MAdds


@dataclass
class SurgeryRow:
    """One (model, variant, selection) measurement."""

    model: str
    pretrained: bool
    mode: str
    copies: str
    exact: bool
    select: str
    base_params: int
    base_macs: int
    macs: list[int]  # N_1..N_K
    params: list[int]
    first_error: float  # N_1 vs base
    last_error: float  # N_K vs base
    seconds: float
    coverage: float = 1.0  # share of the base model's MACs in nested layers (net.coverage().mac_share)


def _base_model(name: str, input_size: int) -> tuple[nn.Module, bool]:
    """The ImageNet variant; EfficientNet-Lite0 with its real weights when they are installed."""
    if name == "efficientnet_lite0":
        try:
            return create(name, input_size=input_size, pretrained=True), True
        except ImportError:
            pass
    return create(name, input_size=input_size), False


@torch.no_grad()
def estimate_batch_norm(model: nn.Module, images: torch.Tensor) -> None:
    """Set every BN's running statistics to those of ``images`` (one train-mode pass)."""
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: after one pass, exactly this batch's statistics
    model.train()
    model(images)
    model.eval()
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def surgery_rows(
    models: Sequence[str] = MODELS, input_size: int = 224, batch: int = 4, k: int = 4, seed: int = 0
) -> list[SurgeryRow]:
    """Measure every model × variant × selection (see module docstring)."""
    rows = []
    generator = torch.Generator().manual_seed(seed)
    for name in models:
        torch.manual_seed(seed)
        model, pretrained = _base_model(name, input_size)
        model.eval()
        calib = torch.randn(batch, 3, input_size, input_size, generator=generator)
        images = torch.randn(batch, 3, input_size, input_size, generator=generator)
        if not pretrained:
            estimate_batch_norm(model, calib)
        profile = profile_model(model, (1, 3, input_size, input_size))
        with torch.no_grad():
            expected = model(images)
        for mode, copies, exact in VARIANTS:
            for select in ("greedy", "random"):
                start = time.perf_counter()
                # the non-exact variant without a budget: at most two copies, every copy and block kept
                rdn = nest(model, k=k, mode=mode, copies=copies, exact=exact, select=select, calib=calib, seed=seed,
                           mac_budget=None)  # fmt: skip
                rdn.eval()
                with torch.no_grad():
                    logits = rdn(images)
                subnets = range(1, rdn.num_subnets + 1)
                rows.append(
                    SurgeryRow(
                        name,
                        pretrained,
                        mode,
                        copies,
                        exact,
                        select,
                        count_params(model),
                        profile.macs,
                        [rdn.macs(s) for s in subnets],
                        [rdn.params(s) for s in subnets],
                        _relative_error(logits[0], expected),
                        _relative_error(logits[-1], expected),
                        time.perf_counter() - start,
                        rdn.coverage().mac_share,
                    )
                )
    return rows


def _millions(values: Sequence[int]) -> str:
    return " / ".join(f"{value / 1e6:.1f}" for value in values)


def surgery_report(rows: Sequence[SurgeryRow], input_size: int, k: int) -> str:
    """Markdown: a cost table (expand, latest, exact, greedy) and an error table (all variants)."""
    lines = [
        f"### Sub-network costs (k = {k}, expand, copies = latest, exact; {input_size}×{input_size}, per image)",
        "",
        "| model | base params (M) | base MACs (M) | N_1..N_K MACs (M) | N_1..N_K params (M) | MACs nested | "
        "N_K / base MACs |",
        "|---|---|---|---|---|---|---|",
    ]
    default = [
        row for row in rows if (row.mode, row.copies, row.exact, row.select) == ("expand", "latest", True, "greedy")
    ]
    for row in default:
        label = row.model + (" (pretrained)" if row.pretrained else "")
        lines.append(
            f"| {label} | {row.base_params / 1e6:.2f} | {row.base_macs / 1e6:.1f} | {_millions(row.macs)} | "
            f"{_millions(row.params)} | {100 * row.coverage:.0f} % | {row.macs[-1] / row.base_macs:.2f}× |"
        )
    paper_base, paper_rdn = PAPER_MOBILENEXT
    lines += [
        "",
        f"Paper Table 1: MobileNeXt-1.0 {paper_base / 1e6:.0f}M → RDN {paper_rdn / 1e6:.0f}M MAdds "
        f"({paper_rdn / paper_base:.2f}×).",
        "",
        "### Relative logit error before fine-tuning (random evaluation images)",
        "",
        "| model | mode | copies | exact | select | K | N_1 error | N_K error | N_K MACs (M) | surgery + eval (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.model} | {row.mode} | {row.copies} | {row.exact} | {row.select} | {len(row.macs)} | "
            f"{row.first_error:.3f} | {row.last_error:.2e} | {row.macs[-1] / 1e6:.1f} | {row.seconds:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="base models (default: all)")
    parser.add_argument("--input-size", type=int, default=224, help="image side (default 224: ImageNet variants)")
    parser.add_argument("--batch", type=int, default=4, help="calibration and evaluation images (random)")
    parser.add_argument("--k", type=int, default=4, help="channel groups per layer (K = 2k - 1 in expand)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = surgery_rows(args.models, args.input_size, args.batch, args.k, args.seed)
    print(surgery_report(rows, args.input_size, args.k))


if __name__ == "__main__":
    main()
