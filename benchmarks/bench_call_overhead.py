"""What one call of the op costs beyond its kernel: the Python entry, timed on problems too small to matter.

An early-exit step runs every nested layer once per stage, often on a few samples, so a layer's
fixed cost per call adds up to the step's cost. This times, side by side in one interleaved run
on one tiny problem (batch 1, 16 → 16 channels, 4 × 4 pixels, K = 4, float32, CPU):

- ours: the public call (``nested_conv2d`` / ``nested_linear`` / the ``rdn.nn`` module), checks
  included, under ``torch.no_grad()`` (the inference path) and under autograd (the registered op);
- the compiled kernel alone: the extension's function with pre-built arguments (what the call
  would cost with no Python around it);
- stock PyTorch: ``F.conv2d`` / ``F.linear`` / ``nn.Conv2d`` / ``nn.Linear`` of the same size.

"entry" is ours minus the kernel alone: the cost of the checks, the backend choice and the views.

    python -m benchmarks.bench_call_overhead [--threads 1] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.harness import TIMING_PRESETS, TimingConfig, machine_info, measure
from rdn.nn import NestedConv2d, NestedLinear
from rdn_kernels import _extension, make_layout, nested_conv2d, nested_linear
from rdn_kernels.nested_conv.geometry import ConvGeometry, extension_arguments

SPLITS = (4, 4, 4, 4)
STAGE = (2, 3)  # one middle group, written into a full-width out=


def cases() -> dict[str, dict[str, Callable[[], object]]]:
    """Per case, the callables timed side by side: "ours", "kernel alone", "stock PyTorch"."""
    x, weight, bias = torch.randn(1, 16, 4, 4), torch.randn(16, 16, 1, 1), torch.randn(16)
    out = torch.empty(1, 16, 4, 4)
    rows, matrix, out_rows = x[:, :, 0, 0].contiguous(), weight[:, :, 0, 0].contiguous(), torch.empty(1, 16)
    rows_as_pixels, out_rows_as_pixels = rows.view(1, 16, 1, 1), out_rows.view(1, 16, 1, 1)  # what the kernel takes
    layout = make_layout(SPLITS, SPLITS)
    kernel_arguments = extension_arguments(layout, ConvGeometry())
    kernel = _extension.extension().nested_conv2d_forward_cpu
    lo, hi = STAGE
    start, stop, read = layout.out_offsets[lo], layout.out_offsets[hi], layout.in_offsets[hi]
    conv_module, linear_module = NestedConv2d(SPLITS, SPLITS, 1), NestedLinear(SPLITS, SPLITS)
    dense_conv, dense_linear = nn.Conv2d(16, 16, 1), nn.Linear(16, 16)
    trained = x.clone().requires_grad_()
    options = {"in_splits": SPLITS, "out_splits": SPLITS}
    return {
        "conv forward": {
            "ours": lambda: nested_conv2d(x, weight, bias, **options),
            "kernel alone": lambda: kernel(x, weight, bias, *kernel_arguments, 0, len(SPLITS), None),
            "stock PyTorch": lambda: F.conv2d(x, weight, bias),
        },
        "conv stage into out=": {
            "ours": lambda: nested_conv2d(x, weight, bias, **options, stages=STAGE, out=out),
            "kernel alone": lambda: kernel(x, weight, bias, *kernel_arguments, lo, hi, out),
            # the per-stage loop's step: one convolution on the stage's slices, copied into out
            "stock PyTorch": lambda: out[:, start:stop].copy_(
                F.conv2d(x[:, :read], weight[start:stop, :read], bias[start:stop])
            ),
        },
        "linear forward": {
            "ours": lambda: nested_linear(rows, matrix, bias, **options),
            "kernel alone": lambda: kernel(rows_as_pixels, weight, bias, *kernel_arguments, 0, len(SPLITS), None),
            "stock PyTorch": lambda: F.linear(rows, matrix, bias),
        },
        "linear stage into out=": {
            "ours": lambda: nested_linear(rows, matrix, bias, **options, stages=STAGE, out=out_rows),
            "kernel alone": lambda: kernel(rows_as_pixels, weight, bias, *kernel_arguments, lo, hi, out_rows_as_pixels),
            "stock PyTorch": lambda: out_rows[:, start:stop].copy_(
                F.linear(rows[:, :read], matrix[start:stop, :read], bias[start:stop])
            ),
        },
        "conv module": {"ours": lambda: conv_module(x), "stock PyTorch": lambda: dense_conv(x)},
        "linear module": {"ours": lambda: linear_module(rows), "stock PyTorch": lambda: dense_linear(rows)},
        "conv forward, autograd": {
            "ours": lambda: nested_conv2d(trained, weight, bias, **options),
            "stock PyTorch": lambda: F.conv2d(trained, weight, bias),
        },
    }


COLUMNS = ("ours", "kernel alone", "stock PyTorch")


def run(config: TimingConfig) -> list[dict[str, object]]:
    """One row per case: median µs (and quartiles) of every callable, and the entry cost."""
    table = []
    for name, functions in cases().items():
        grad = contextlib.nullcontext() if name.endswith("autograd") else torch.no_grad()
        with grad:
            timings = measure(functions, torch.device("cpu"), config)
        row: dict[str, object] = {"case": name}
        for column in COLUMNS:
            timing = timings.get(column)
            row[column] = None if timing is None else (timing.median_ms * 1e3, timing.q25_ms * 1e3, timing.q75_ms * 1e3)
        if row["kernel alone"] is not None:
            row["entry"] = row["ours"][0] - row["kernel alone"][0]
        table.append(row)
    return table


def markdown(table: list[dict[str, object]], info: dict[str, str], command: str) -> str:
    lines = ["# Cost of one call of the op beyond its kernel (CPU)", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += [f"- command: `{command}`", ""]
    lines += [
        "Batch 1, 16 → 16 channels, 4 × 4 pixels, K = 4, float32: the kernel's work is negligible, so the",
        "times are what a call costs. Cells: median µs [quartiles] of interleaved samples. *entry* = ours −",
        "kernel alone: the argument checks, the backend choice and the views of the public call. *ours ÷",
        "stock*: against the dense PyTorch call of the same size (a fixed cost per layer and per stage).",
        "",
        "| case | ours µs | kernel alone µs | stock PyTorch µs | entry µs | ours ÷ stock |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def cell(value) -> str:
        return "" if value is None else f"{value[0]:.2f} [{value[1]:.2f}–{value[2]:.2f}]"

    for row in table:
        ratio = row["ours"][0] / row["stock PyTorch"][0]
        entry = "" if row.get("entry") is None else f"{row['entry']:.2f}"
        lines.append(f"| {row['case']} | {cell(row['ours'])} | {cell(row['kernel alone'])} | "
                     f"{cell(row['stock PyTorch'])} | {entry} | {ratio:.2f}× |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--timing", choices=sorted(TIMING_PRESETS), default="full")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--name", default="call_overhead_cpu", help="file stem of the markdown report")
    args = parser.parse_args(argv)
    if not _extension.has_cpu_kernels():
        parser.error("the C++ extension is not built: run `make build` first")
    torch.set_num_threads(args.threads)
    table = run(TIMING_PRESETS[args.timing])
    info = machine_info(torch.device("cpu")) | {"torch_threads": str(torch.get_num_threads())}
    command = "python -m benchmarks.bench_call_overhead " + " ".join(argv if argv is not None else [])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.md"
    path.write_text(markdown(table, info, command.strip()))
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
