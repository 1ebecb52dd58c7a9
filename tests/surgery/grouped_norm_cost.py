"""What ``nest(..., norms="grouped")`` costs: a small ConvNeXt-style model on Fashion-MNIST (CPU).

Not a test: the measurement behind docs/surgery.md's numbers. For one seed and one kind of norm:

- ``ln``: the ConvNeXt-style model of ``test_coverage.py`` (LayerNorm2d in the stem, the blocks and
  the downsampling, a LayerNorm of the pooled features); its norms couple channels, so only
  ``norms="grouped"`` nests it (``"fixed"`` nests nothing);
- ``bn``: the same architecture with BatchNorm in place of every norm (per channel: nested as is),
  the reference a nesting-friendly norm gives under the same schedule.

The base model trains ``--epochs`` epochs on the first ``--train`` training images (AdamW, one-cycle,
batch 128), is nested (k = 4, expand: K = 7, ``skip=0``), and all exits are fine-tuned jointly
(mean of the exits' cross-entropies) for ``--finetune`` epochs; test accuracy of every exit before
and after, one JSON line. ``python -m tests.surgery.grouped_norm_cost --kind ln --seed 0``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdn.data import read_idx
from rdn.surgery import nest
from tests.surgery.test_coverage import ConvNeXtToy

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def load(split: str) -> tuple[Tensor, Tensor]:
    """Normalised Fashion-MNIST images (N, 1, 28, 28) and labels of ``split`` ("train" or "t10k")."""
    images = torch.tensor(read_idx(FASHION_MNIST / f"{split}-images-idx3-ubyte.gz")).float().div(255)
    labels = torch.tensor(read_idx(FASHION_MNIST / f"{split}-labels-idx1-ubyte.gz")).long()
    return (images.unsqueeze(1) - 0.286) / 0.353, labels


def make(kind: str, seed: int, width: int = 24) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "ln":
        return ConvNeXtToy(in_channels=1, classes=10, width=width)
    model = ConvNeXtToy(in_channels=1, classes=10, width=width, block_norm=nn.BatchNorm2d)
    model.stem[1], model.down[0], model.norm = nn.BatchNorm2d(width), nn.BatchNorm2d(width), nn.BatchNorm1d(2 * width)
    return model


def train(model: nn.Module, images: Tensor, labels: Tensor, epochs: int, lr: float, seed: int) -> None:
    """AdamW, one-cycle; a model with several exits is trained on the mean of their losses."""
    steps = len(images) // 128
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for step in range(steps):
            batch = order[step * 128 : (step + 1) * 128]
            outputs = model(images[batch])
            outputs = outputs if isinstance(outputs, list) else [outputs]
            loss = sum(F.cross_entropy(output, labels[batch]) for output in outputs) / len(outputs)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


@torch.no_grad()
def accuracies(model: nn.Module, images: Tensor, labels: Tensor) -> list[float]:
    """Test accuracy (%) of every exit."""
    correct = None
    for start in range(0, len(images), 1000):
        outputs = model(images[start : start + 1000])
        outputs = outputs if isinstance(outputs, list) else [outputs]
        hits = torch.stack([(output.argmax(1) == labels[start : start + 1000]).sum() for output in outputs])
        correct = hits if correct is None else correct + hits
    return [round(100 * value.item() / len(images), 2) for value in correct]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("ln", "bn"), required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=10_000, help="training images used")
    parser.add_argument("--epochs", type=int, default=3, help="base training epochs")
    parser.add_argument("--finetune", type=int, default=1, help="joint fine-tuning epochs")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train_images, train_labels = load("train")
    train_images, train_labels = train_images[: args.train], train_labels[: args.train]
    test_images, test_labels = load("t10k")
    model = make(args.kind, args.seed)
    train(model, train_images, train_labels, args.epochs, 4e-3, args.seed)
    base = accuracies(model, test_images, test_labels)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = nest(model, k=4, calib=train_images[-256:], skip=0, norms="grouped" if args.kind == "ln" else "fixed")
    net.eval()
    before = accuracies(net, test_images, test_labels)
    train(net, train_images, train_labels, args.finetune, 1e-3, args.seed)
    after = accuracies(net, test_images, test_labels)
    row = {
        "kind": args.kind, "seed": args.seed, "train": args.train, "epochs": args.epochs, "finetune": args.finetune,
        "base": base, "before": before, "after": after,
        "macs_M": [round(net.macs(s) / 1e6, 2) for s in range(1, net.num_subnets + 1)],
        "seconds": round(time.perf_counter() - start),
    }  # fmt: skip
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
