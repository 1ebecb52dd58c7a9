"""`make demo` (kernel part): a nested convolution on every available backend, checked and timed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import rdn_kernels
from rdn_kernels import make_layout, nested_conv2d
from rdn_kernels.timing import time_median


def _median_ms(function, repeats: int = 20) -> float:
    return 1e3 * time_median(function, repeats=repeats)


def main() -> None:
    torch.manual_seed(0)
    in_splits = out_splits = (24, 24, 24, 24)  # K = 4 groups of a 96 → 96 1×1 conv
    layout = make_layout(in_splits, out_splits)
    input = torch.randn(16, 96, 28, 28).to(memory_format=torch.channels_last)
    weight = torch.randn(96, 96, 1, 1) / 96**0.5
    print(f"input {tuple(input.shape)} channels_last, weight {tuple(weight.shape)}, K = {layout.num_groups}")
    print(f"backends available on CPU: {rdn_kernels.available_backends('cpu')}")
    splits = dict(in_splits=in_splits, out_splits=out_splits)
    reference = nested_conv2d(input.double(), weight.double(), **splits, backend="torch")
    dense_ms = _median_ms(lambda: F.conv2d(input, weight))
    useful = layout.useful_macs_per_pixel() / (96 * 96)
    print(f"dense F.conv2d: {dense_ms:.3f} ms; FLOP-ideal (dense × {useful:.3f} useful) {dense_ms * useful:.3f} ms")
    for backend in rdn_kernels.available_backends("cpu"):
        output = nested_conv2d(input, weight, **splits, backend=backend)
        error = (output.double() - reference).abs().max().item()
        ms = _median_ms(lambda backend=backend: nested_conv2d(input, weight, **splits, backend=backend))
        print(f"  {backend:>6}: output {tuple(output.shape)}, max |error| vs float64 {error:.2e}, {ms:.3f} ms")
    # Incremental stage: compute only group 3 into a buffer that already holds groups 1–2.
    out = torch.zeros(16, 96, 28, 28).to(memory_format=torch.channels_last)
    nested_conv2d(input, weight, **splits, stages=(0, 2), out=out)
    nested_conv2d(input, weight, **splits, stages=(2, 3), out=out)
    filled = layout.out_offsets[3]
    error = (out[:, :filled].double() - reference[:, :filled]).abs().max().item()
    print(f"stages (0,2) then (2,3) into one buffer: groups 1–3 match the full pass (max |error| {error:.2e})")


if __name__ == "__main__":
    main()
