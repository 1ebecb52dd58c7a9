"""Tiny models and data for the training tests (seconds, not minutes, on a busy CPU)."""

from __future__ import annotations

import torch
from torch import nn

from rdn.data import DataSplits, load_dataset
from rdn.surgery import RussianDollNet, nest


class TinyNet(nn.Module):
    """3×3 stem → 1×1 → ReLU → 1×1 → ReLU → pool → linear, on 1×16×16 images.

    No BN and no dropout: a data-parallel run computes exactly the single-process loss (BN would
    normalise each process's half batch on its own).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 12, 1)
        self.last = nn.Conv2d(12, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.last(torch.relu(self.mid(x))))
        return self.classifier(torch.flatten(self.pool(x), 1))


def synthetic(num_samples: int = 160) -> DataSplits:
    return load_dataset("synthetic", num_samples=num_samples, calib_size=16, test_size=32)


def tiny_rdn(seed: int = 0, k: int = 2, **options) -> RussianDollNet:
    """An RDN (expand, K = 2k - 1 exits) of a seeded :class:`TinyNet`, the stem un-nested; ``options``: more
    :func:`rdn.nest` options (default: its MAC budget's search)."""
    torch.manual_seed(seed)
    calib = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    return nest(TinyNet(), k=k, calib=calib, skip=1, seed=seed, **options)
