"""MAC budget → how far N_K is from the base model before fine-tuning, on the pretrained EfficientNet-Lite0.

For each budget, ``rdn.nest(base, k, calib=..., mac_budget=budget, activation_budget=None)`` runs the
budget's search on the MACs alone (:mod:`rdn.surgery.search`), and one more row runs ``rdn.nest``'s
default (1.2x the MACs and 1.1x the feature maps); the table gives the construction it chose, N_K's
MACs and feature maps over the base's,
and N_K's logit error (share of the base logits' variance not reproduced) and top-1 agreement with the
base model on held-out images, next to the exact surgery (``exact=True``: N_K is the base, ~1.8× its
MACs). Images: random crops (40–100 % of the shorter side, flipped half the time, bicubic to 224 px,
Lite0's normalisation) of the photos scikit-image ships; the held-out crops are other crops of the same
photos, so read the errors as "how much of the function survives", not as ImageNet accuracy.

    python -m benchmarks.budget_curve --out benchmarks/results/budget_curve_lite0_cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import rdn
from rdn.models.pretrained import INPUT_SIZE, MEAN, STD
from rdn.models.profile import profile_model
from rdn.surgery import costs
from rdn.surgery.search import logit_error

# scikit-image's photos that load without a download (grey ones are repeated to three channels).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle", "camera", "coins", "grass", "gravel", "brick", "moon", "cell")  # fmt: skip
BUDGETS = (0.9, 1.0, 1.1, 1.2, 1.3, 1.5)


def photos() -> list[torch.Tensor]:
    """The photos as float (3, H, W) tensors in [0, 1]."""
    import skimage.data  # a test dependency (Makefile): this benchmark runs from the repository

    images = []
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        image = image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: (left, right, disparity)
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array[..., :3]
        images.append(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1))
    return images


def random_crops(images: list[torch.Tensor], count: int, seed: int) -> torch.Tensor:
    """(count, 3, 224, 224) normalised crops, cycling through ``images``."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    crops = []
    for index in range(count):
        image = images[index % len(images)]
        _, height, width = image.shape
        side = int(min(height, width) * (0.4 + 0.6 * float(torch.rand((), generator=generator))))
        top = int(torch.randint(0, height - side + 1, (), generator=generator))
        left = int(torch.randint(0, width - side + 1, (), generator=generator))
        crop = image[:, top : top + side, left : left + side]
        if float(torch.rand((), generator=generator)) < 0.5:
            crop = crop.flip(2)
        crop = F.interpolate(crop[None], size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", align_corners=False)[0]
        crops.append((crop.clamp(0, 1) - mean) / std)
    return torch.stack(crops)


def measure(k: int, calib_count: int, test_count: int, budgets: tuple[float, ...]) -> list[dict]:
    base = rdn.models.create("efficientnet_lite0", pretrained=True).eval()
    images = photos()
    calib, test = random_crops(images, calib_count, seed=0), random_crops(images, test_count, seed=1)
    with torch.no_grad():
        base_logits = base(test)
    base_macs = profile_model(base, calib[:1]).macs
    rows = []
    settings = [("exact", {"exact": True})]
    settings += [(f"{budget:g}", {"mac_budget": budget, "activation_budget": None}) for budget in budgets]
    settings.append(("default: 1.2, feature maps 1.1", {}))
    for name, options in settings:
        started = time.perf_counter()
        try:
            net = rdn.nest(base, k=k, calib=calib, **options).eval()
        except ValueError as error:
            rows.append({"budget": name, "error": str(error)})
            continue
        seconds = time.perf_counter() - started
        with torch.no_grad():
            logits = net(test, subnet=net.num_subnets)
        config = net.record.config
        rows.append({
            "budget": name,
            "copy_fraction": config.copy_fraction,
            "compensate": config.compensate,
            "pruned_blocks": sum(len(blocks) for blocks in net.record.pruned_blocks.values()),
            "mac_ratio": net.macs(net.num_subnets) / base_macs,
            "activation_ratio": costs.activation_ratio(net.plan, net.num_subnets),
            "n1_mac_ratio": net.macs(1) / base_macs,
            "logit_error": logit_error(logits, base_logits),
            "agreement": float((logits.argmax(1) == base_logits.argmax(1)).double().mean()),
            "surgery_seconds": seconds,
            "candidates": list(net.record.search or ()),
        })  # fmt: skip
        print(json.dumps({key: value for key, value in rows[-1].items() if key != "candidates"}), flush=True)
    return rows


def write(rows: list[dict], out: Path, k: int, calib_count: int, test_count: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "budget_curve.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "# MAC budget → N_K's distance from the pretrained EfficientNet-Lite0 before fine-tuning",
        "",
        f"`python -m benchmarks.budget_curve` — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads. k = {k} (K = {2 * k - 1}); calibration: {calib_count} random crops of scikit-image's "
        f"{len(PHOTOS)} photos (the search builds on three quarters, scores on the last quarter); held out: "
        f"{test_count} other crops of the same photos.",
        "",
        "| MAC budget | chosen copy_fraction | compensate | blocks dropped | N_K / base MACs | N_K / base feature "
        "maps | N_1 / base MACs | logit error (held out) | top-1 agreement with base | surgery s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['budget']} | out of reach: {row['error'][:120]} | | | | | | | | |")
            continue
        lines.append(
            f"| {row['budget']} | {row['copy_fraction']:g} | {row['compensate']} | {row['pruned_blocks']} "
            f"| {row['mac_ratio']:.3f} | {row['activation_ratio']:.3f} | {row['n1_mac_ratio']:.3f} "
            f"| {row['logit_error']:.4f} "
            f"| {row['agreement']:.3f} | {row['surgery_seconds']:.0f} |"
        )
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for README.md and budget_curve.json")
    parser.add_argument("--k", type=int, default=4, help="channel groups per nested layer")
    parser.add_argument("--calib", type=int, default=96, help="calibration crops")
    parser.add_argument("--test", type=int, default=64, help="held-out crops")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS), help="MAC budgets to try")
    arguments = parser.parse_args(argv)
    rows = measure(arguments.k, arguments.calib, arguments.test, tuple(arguments.budgets))
    write(rows, arguments.out, arguments.k, arguments.calib, arguments.test)


if __name__ == "__main__":
    main()
