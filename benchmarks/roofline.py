"""Analytical cost model of a nested convolution: useful FLOPs, minimal bytes, ideal times.

For a case (layer, batch N, K groups, mode; see :class:`benchmarks.shapes.Case`) computing
output groups lo..hi-1:

- useful FLOPs = 2 · N · H_out · W_out · kh · kw · Σ_{(j, i) in mask, lo <= j < hi} d_j · c_i
  (``layout.useful_macs_per_pixel``); the backward mode (forward + grad input + grad weight)
  counts it three times. Dense FLOPs are the same with the whole D × C weight.
- minimal bytes (forward) = input channels read, once + the weight blocks in the mask + the
  output channels written, once. Forward + backward: the forward's bytes plus grad_output read,
  input and weight blocks read again, grad_input and grad_weight blocks written
  (3 · input + 3 · weight + 2 · output). In channels_last (``channels_last=True``) a group's
  channels are not whole planes but a run inside every pixel's channels, and memory moves in
  64-byte lines: the input and output count every line the runs touch, and an output line only
  part of which the case writes is read too (the CPU reads a line before it can merge a partial
  write into it). So a stage writing d_s of D channels per pixel moves about 2·D/d_s times the
  bytes of its compact output.
- FLOP-ideal time = measured dense time × useful FLOPs / dense FLOPs (any device; on a CPU this
  is the ideal: nothing about the machine is assumed, the dense conv's speed is measured).
- roofline time (GPU) = max(useful FLOPs / peak FLOP/s, minimal bytes / peak bandwidth).

Peak figures used (dense, i.e. without 2:4 structured sparsity; NVIDIA's datasheets quote the
tensor-core numbers "with sparsity", which are twice these):

=================  ================  ===========  ==================  ==============
GPU                BF16/FP16 tensor  TF32 tensor  FP32 (CUDA cores)   HBM bandwidth
=================  ================  ===========  ==================  ==============
H100 SXM5 80 GB    989.4 TFLOP/s     494.7        66.9                3.35 TB/s
H100 PCIe 80 GB    756.5             378.0        51.0                2.0 TB/s
H200 SXM 141 GB    989.4             494.7        66.9                4.8 TB/s
=================  ================  ===========  ==================  ==============

Sources: NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100: SXM FP32
67 TFLOPS, TF32 989 TFLOPS*, BF16/FP16 1,979 TFLOPS*, 3.35 TB/s; PCIe FP32 51, TF32 756*,
BF16/FP16 1,513*, 2 TB/s; * with sparsity) and NVIDIA H200 datasheet
(nvidia.com/en-us/data-center/h200: the same compute figures as H100 SXM, 141 GB HBM3e at
4.8 TB/s). The exact dense values (989.4 = 1978.9 / 2, 66.9) are the clock-derived figures of
the Hopper whitepaper.

Which peak applies to an fp32 case follows what PyTorch does by default: convolutions run on
TF32 tensor cores (cuDNN's convolution precision, ``rdn_kernels.backends.cudnn_conv_allows_tf32()``,
default True), linear layers in full FP32 (``torch.backends.cuda.matmul.allow_tf32``, default False).

``python -m benchmarks.roofline`` writes the table of every GPU-plan shape (forward mode).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.shapes import Case, plan
from rdn_kernels.backends import cudnn_conv_allows_tf32

# Math units a case can run on; see the module docstring for how fp32 picks one.
MATH_UNITS = ("tensor16", "tf32", "fp32")


@dataclass(frozen=True)
class GpuPeaks:
    """Dense peak throughputs (TFLOP/s) and HBM bandwidth (TB/s) of one GPU model."""

    name: str
    tensor16_tflops: float
    tf32_tflops: float
    fp32_tflops: float
    bandwidth_tb_s: float

    def tflops(self, math_unit: str) -> float:
        if math_unit not in MATH_UNITS:
            raise ValueError(f"math_unit must be one of {MATH_UNITS}, got {math_unit!r}")
        return {"tensor16": self.tensor16_tflops, "tf32": self.tf32_tflops, "fp32": self.fp32_tflops}[math_unit]


H100_SXM = GpuPeaks("H100 SXM", 989.4, 494.7, 66.9, 3.35)
H100_PCIE = GpuPeaks("H100 PCIe", 756.5, 378.0, 51.0, 2.0)
H200_SXM = GpuPeaks("H200 SXM", 989.4, 494.7, 66.9, 4.8)


def gpu_peaks(device_name: str) -> GpuPeaks | None:
    """The peaks of a GPU from its ``torch.cuda.get_device_name``; None for a GPU not in the table."""
    name = device_name.upper()
    if "H200" in name:
        return H200_SXM
    if "H100" in name:
        return H100_PCIE if "PCIE" in name else H100_SXM
    return None


def math_unit(dtype: torch.dtype, is_linear: bool) -> str | None:
    """The unit PyTorch's own conv / linear uses for ``dtype`` on a GPU (None: no tensor-core path)."""
    if dtype in (torch.float16, torch.bfloat16):
        return "tensor16"
    if dtype == torch.float32:
        tf32 = torch.backends.cuda.matmul.allow_tf32 if is_linear else cudnn_conv_allows_tf32()
        return "tf32" if tf32 else "fp32"
    return None


def _pixels(case: Case) -> int:
    height_out, width_out = case.layer.output_size
    return case.batch * height_out * width_out


def _passes(case: Case) -> int:
    return 3 if case.mode == "backward" else 1


def useful_flops(case: Case) -> int:
    lo, hi = case.stages
    kernel_area = case.layer.kernel**2
    return 2 * _pixels(case) * kernel_area * case.layout.useful_macs_per_pixel(lo, hi) * _passes(case)


def dense_flops(case: Case) -> int:
    """FLOPs of the dense conv of the whole layer in the case's mode (the FLOP-ideal's yardstick)."""
    layer = case.layer
    return 2 * _pixels(case) * layer.kernel**2 * layer.out_channels * layer.in_channels * _passes(case)


def useful_fraction(case: Case) -> float:
    return useful_flops(case) / dense_flops(case)


def minimal_bytes(case: Case, channels_last: bool = False) -> int:
    """Bytes a case must move at least (module docstring); ``channels_last``: NHWC operands, counted
    in 64-byte lines."""
    layout, layer = case.layout, case.layer
    lo, hi = case.stages
    element_size = torch.empty((), dtype=case.dtype).element_size()
    read_groups = sorted({i for j in range(lo, hi) for i in range(j + 1) if layout.mask[j][i]})
    input_elements = case.batch * sum(layout.in_splits[i] for i in read_groups) * layer.height * layer.width
    weight_elements = layout.useful_macs_per_pixel(lo, hi) * layer.kernel**2
    output_elements = _pixels(case) * sum(layout.out_splits[lo:hi])
    if case.mode == "backward":
        return (3 * input_elements + 3 * weight_elements + 2 * output_elements) * element_size
    if not channels_last or layer.is_linear:
        return (input_elements + weight_elements + output_elements) * element_size
    in_offsets, out_offsets = layout.in_offsets, layout.out_offsets
    input_runs = [(in_offsets[i], in_offsets[i + 1]) for i in read_groups]
    input_lines, _ = channel_run_lines(layer.in_channels, input_runs, element_size)
    output_runs = [(out_offsets[lo], out_offsets[hi])]
    output_lines, partial_lines = channel_run_lines(layer.out_channels, output_runs, element_size)
    input_bytes = input_lines * case.batch * layer.height * layer.width
    output_bytes = (output_lines + partial_lines) * _pixels(case)
    return round(input_bytes + weight_elements * element_size + output_bytes)


def channel_run_lines(channels: int, runs: list[tuple[int, int]], element_size: int,
                      line_bytes: int = 64) -> tuple[float, float]:
    """Per pixel of an NHWC tensor with ``channels`` channels (line-aligned): the bytes of the
    ``line_bytes`` lines that the channel ``runs`` [start, stop) touch, and of those lines that they
    cover only in part, averaged over the pixels (the pattern repeats every line_bytes /
    gcd(row bytes, line_bytes) pixels)."""
    row_bytes = channels * element_size
    period = line_bytes // math.gcd(row_bytes, line_bytes)
    covered = bytearray(period * row_bytes)
    for pixel in range(period):
        for start, stop in runs:
            first, last = pixel * row_bytes + start * element_size, pixel * row_bytes + stop * element_size
            covered[first:last] = b"\x01" * (last - first)
    touched = partial = 0
    for begin in range(0, len(covered), line_bytes):
        used = sum(covered[begin : begin + line_bytes])
        touched += used > 0
        partial += 0 < used < line_bytes
    return touched * line_bytes / period, partial * line_bytes / period


def flop_ideal_ms(case: Case, dense_ms: float) -> float:
    """The FLOP-ideal: the measured dense time scaled by the useful fraction."""
    return dense_ms * useful_fraction(case)


def roofline_ms(case: Case, gpu: GpuPeaks, unit: str) -> float:
    compute_s = useful_flops(case) / (gpu.tflops(unit) * 1e12)
    memory_s = minimal_bytes(case) / (gpu.bandwidth_tb_s * 1e12)
    return max(compute_s, memory_s) * 1e3


def roofline_bound(case: Case, gpu: GpuPeaks, unit: str) -> str:
    """``"compute"`` or ``"memory"``: which term of the roofline is the larger."""
    compute_s = useful_flops(case) / (gpu.tflops(unit) * 1e12)
    return "compute" if compute_s >= minimal_bytes(case) / (gpu.bandwidth_tb_s * 1e12) else "memory"


def roofline_table(plan_name: str = "gpu") -> str:
    """Markdown table: every layer × batch × K of a plan, forward mode, ideal µs on H100 SXM and H200."""
    bench_plan = plan(plan_name)
    units = (("bf16", torch.bfloat16, "tensor16"), ("tf32", torch.float32, "tf32"), ("fp32", torch.float32, "fp32"))
    gpus = (H100_SXM, H200_SXM)
    header = ["shape", "N", "K", "useful GFLOP", "useful fraction", "min MB bf16", "min MB fp32"]
    header += [f"{gpu.name} {label} µs" for gpu in gpus for label, _, _ in units]
    lines = [
        f"# Roofline of the nested conv, plan `{plan_name}` (forward, all K groups)",
        "",
        "Ideal time = max(useful FLOPs / peak, minimal bytes / bandwidth) in µs; `c` = compute-bound, "
        "`m` = memory-bound. Peaks and sources: `benchmarks/roofline.py`. Generated by "
        "`python -m benchmarks.roofline`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for layer in bench_plan.layers:
        for batch in bench_plan.batches:
            for num_groups in bench_plan.group_counts:
                cases = {label: Case(layer, batch, num_groups, dtype, "forward") for label, dtype, _ in units}
                bf16, fp32 = cases["bf16"], cases["fp32"]
                cells = [layer.label, str(batch), str(num_groups), f"{useful_flops(bf16) / 1e9:.3f}",
                         f"{useful_fraction(bf16):.3f}", f"{minimal_bytes(bf16) / 1e6:.2f}",
                         f"{minimal_bytes(fp32) / 1e6:.2f}"]
                for gpu in gpus:
                    for label, _, unit in units:
                        case = cases[label]
                        bound = roofline_bound(case, gpu, unit)[0]
                        cells.append(f"{roofline_ms(case, gpu, unit) * 1e3:.1f} {bound}")
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="gpu", help="shape plan (see benchmarks.shapes.plan)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output directory")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"roofline_{args.plan}_h100_h200.md"
    path.write_text(roofline_table(args.plan))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
