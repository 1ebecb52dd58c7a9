"""Ahead-of-time compile check of every Triton kernel configuration for sm_90 and sm_80.

No GPU is needed: ``triton.compile`` lowers a kernel to PTX and a cubin for any target, and the
``cuobjdump`` shipped in Triton's wheel reads registers, stack and static shared memory from the
cubin. For every kernel × tile configuration (``FORWARD_CONFIGS`` … of
:mod:`rdn_kernels.nested_conv.triton`) × precision it is offered for (bf16, fp16, fp32, and fp32
tensors with TF32 allowed) × channel alignment × target, a row passes when

- nothing spills: stack and local memory are 0 bytes;
- shared memory (Triton's dynamic allocation + the cubin's static shared) fits one block
  (227 KiB on sm_90, 163 KiB on sm_80);
- bf16/fp16/tf32 tiles run on tensor cores: ``wgmma`` in the PTX on sm_90, ``mma`` on sm_80.

Channel alignment is the kernels' CHANNEL_ALIGN hint; a configuration is compiled at the smallest
alignment it is offered for (``TileConfig.min_align``: unaligned layouts load unvectorised and
unpipelined, which costs registers) and at 16 (vectorised, pipelined: more shared memory).

A configuration that fails is removed from the lists in ``triton.py``; the check is not loosened.

Kernels are compiled with the argument specialisation the JIT gives a representative call
(channels_last activations and weights, 3×3, stride 1, padding 1, 8×256×28×28 in 4 groups):
integer arguments equal to 1 become constants, those divisible by 16 and all pointers carry the
divisibility hint (``triton.runtime.jit``'s binder does the same). Not covered: other
specialisations (1×1 kernels, odd strides), and float64, which reuses the fp32 tiles.

Run ``python -m tools.static_check_triton`` in the repository root to write the table to
``benchmarks/results/triton_static_check.md`` (found from this file, whatever the current
directory); the exit status is 1 when a row fails.
Compiled kernels are cached by Triton (``TRITON_CACHE_DIR``), so a second run takes seconds.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from rdn_kernels.nested_conv import triton as backend
from rdn_kernels.nested_conv import triton_kernels
from tools import RESULTS_DIR

# name → (pointer element type, tl.dot input precision, torch dtype the configs are offered for,
# tensor cores required)
PRECISIONS = {
    "bf16": ("bf16", "ieee", "bfloat16", True),
    "fp16": ("fp16", "ieee", "float16", True),
    "fp32": ("fp32", "ieee", "float32", False),
    "tf32": ("fp32", "tf32", "float32", True),
}
FULL_ALIGNMENT = 16
# (compute capability, bytes of shared memory one block may use, tensor-core instruction prefix)
TARGETS = {"sm_90": (90, 227 * 1024, "wgmma"), "sm_80": (80, 163 * 1024, "mma")}
DEFAULT_OUTPUT = RESULTS_DIR / "triton_static_check.md"

# The representative problem the argument specialisation is taken from (see module docstring).
_BATCH, _CHANNELS, _SIZE, _GROUPS = 8, 256, 28, 4


@dataclass
class CheckResult:
    """One kernel × configuration × precision × alignment × target compile and what it costs."""

    kernel: str
    kernel_size: int
    config: str
    precision: str
    channel_align: int
    target: str
    num_warps: int
    num_stages: int
    registers: int = 0
    stack_bytes: int = 0
    local_bytes: int = 0
    shared_bytes: int = 0
    tensor_core_op: str = "-"
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _kernels():
    """name → (JIT function, tile configurations) of every Triton kernel of the package."""
    if not isinstance(triton_kernels.nested_conv_forward_kernel, triton.runtime.JITFunction):
        raise RuntimeError(
            "the Triton kernels were imported in interpreter mode (TRITON_INTERPRET=1); "
            "run the static check in a process without it"
        )
    return {
        "forward": (triton_kernels.nested_conv_forward_kernel, backend.FORWARD_CONFIGS),
        "grad_input": (triton_kernels.nested_conv_grad_input_kernel, backend.GRAD_INPUT_CONFIGS),
        "grad_weight": (triton_kernels.nested_conv_grad_weight_kernel, backend.GRAD_WEIGHT_CONFIGS),
    }


# Kernel sizes each kernel is checked at: the forward's 1×1 is its own (POINTWISE) code path and
# the hot path of MobileNet-style networks.
KERNEL_SIZES = {"forward": (3, 1), "grad_input": (3,), "grad_weight": (3,)}


def _sample(kernel_name: str, k: int, channels: int = _CHANNELS, channel_base: int = 0) -> dict:
    """Pointer element types and argument values of a representative k×k call (``T`` = the dtype).

    ``channel_base``: the first computed output channel of a stage-shaped result (an int argument
    the JIT turns into a constant when it is 1).
    """
    n, c, size = _BATCH, channels, _SIZE
    pixels = n * size * size
    # channels_last strides of (N, C, H, W) activations and (D, C, kh, kw) weights.
    act = {"n": size * size * c, "c": 1, "h": size * c, "w": c}
    wgt = {"o": k * k * c, "i": 1, "h": k * c, "w": c}
    pad = k // 2
    geometry = {"stride_h": 1, "stride_w": 1, "pad_h": pad, "pad_w": pad, "dil_h": 1, "dil_w": 1}
    shape = {"height": size, "width": size, "height_out": size, "width_out": size, "kernel_h": k, "kernel_w": k}
    common = {**geometry, **shape, "in_channels": c, "out_channels": c}

    def strides(prefix: str, names: dict) -> dict:
        return {f"{prefix}_stride_{axis}": value for axis, value in names.items()}

    if kernel_name == "forward":
        return {
            "pointers": {"x_ptr": "T", "w_ptr": "T", "bias_ptr": "T", "y_ptr": "T", "segments_ptr": "i32",
                         "runs_ptr": "i32"},
            "values": {
                **common, **strides("x", act), **strides("w", wgt), **strides("y", act),
                "num_segments": _GROUPS, "num_pixels": pixels, "y_channel_base": channel_base, "pixel_bucket": pixels,
                "HAS_BIAS": True, "POINTWISE": k == 1,
            },
        }  # fmt: skip
    if kernel_name == "grad_input":
        return {
            "pointers": {"go_ptr": "T", "w_ptr": "T", "gx_ptr": "T", "segments_ptr": "i32", "runs_ptr": "i32",
                         "phases_ptr": "i32"},
            "values": {
                **common, **strides("go", act), **strides("w", wgt), **strides("gx", act),
                "num_segments": _GROUPS, "num_phase_pixels": pixels, "phase_height": size, "phase_width": size,
                "tap_step_h": 1, "tap_step_w": 1, "go_channel_base": channel_base, "pixel_bucket": pixels,
            },
        }  # fmt: skip
    return {
        "pointers": {"x_ptr": "T", "go_ptr": "T", "gw_ptr": "T", "blocks_ptr": "i32"},
        "values": {
            **common, **strides("x", act), **strides("go", act), **strides("gw", wgt),
            "num_blocks": _GROUPS, "num_pixels": pixels, "pixels_per_split": pixels, "go_channel_base": channel_base,
            "gw_stride_split": 0,
        },
    }  # fmt: skip


def _source(kernel, sample: dict, precision: str, channel_align: int, config):
    """``ASTSource`` with the JIT's specialisation of ``sample``: ints == 1 are constants, ints
    divisible by 16 and pointers get ``tt.divisibility = 16``."""
    element, input_precision, _, _ = PRECISIONS[precision]
    constants = {
        "CHANNEL_ALIGN": channel_align,
        "ACC_DTYPE": tl.float32,
        "INPUT_PRECISION": input_precision,
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "BLOCK_K": config.block_k,
    }
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in sample["pointers"]:
            signature[name] = "*" + (element if sample["pointers"][name] == "T" else sample["pointers"][name])
            attrs[(index,)] = [["tt.divisibility", 16]]
            continue
        value = sample["values"].get(name, constants.get(name))
        if value is None:
            raise KeyError(f"the static check has no sample value for argument {name!r} of {kernel.__name__}")
        if name in constants or isinstance(value, bool) or value == 1:
            signature[name] = "constexpr"
            constants[name] = value
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)


_RESOURCE_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def check_one(
    kernel_name: str,
    kernel_size: int,
    config: backend.TileConfig,
    precision: str,
    channel_align: int,
    target_name: str,
    channels: int = _CHANNELS,
    channel_base: int = 0,
) -> CheckResult:
    """Compile one kernel configuration for one target and judge its resource usage (a call with
    ``channels`` channels channels_last, whose computed output channels start at ``channel_base``)."""
    kernel, _ = _kernels()[kernel_name]
    capability, shared_limit, tensor_core_op = TARGETS[target_name]
    result = CheckResult(
        kernel_name,
        kernel_size,
        str(config),
        precision,
        channel_align,
        target_name,
        config.num_warps,
        config.num_stages,
    )
    compiled = triton.compile(
        _source(kernel, _sample(kernel_name, kernel_size, channels, channel_base), precision, channel_align, config),
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    with tempfile.TemporaryDirectory() as scratch:
        cubin = Path(scratch) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "-res-usage", str(cubin)], capture_output=True, text=True, check=True)
    match = _RESOURCE_USAGE.search(usage.stdout)
    if match is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{usage.stdout}")
    registers, stack, static_shared, local = map(int, match.groups())
    result.registers, result.stack_bytes, result.local_bytes = registers, stack, local
    result.shared_bytes = compiled.metadata.shared + static_shared
    ptx = compiled.asm["ptx"]
    if re.search(r"\bwgmma\.mma_async", ptx):
        result.tensor_core_op = "wgmma"
    elif re.search(r"\bmma\.sync", ptx):
        result.tensor_core_op = "mma"
    if stack or local:
        result.problems.append(f"spills ({registers} registers, {stack} B stack, {local} B local)")
    if result.shared_bytes > shared_limit:
        result.problems.append(f"{result.shared_bytes} B shared memory > {shared_limit} B")
    if PRECISIONS[precision][3] and result.tensor_core_op != tensor_core_op:
        result.problems.append(f"no {tensor_core_op} instruction (found {result.tensor_core_op})")
    return result


def jobs() -> list[tuple[str, int, backend.TileConfig, str, int, str]]:
    """Every (kernel, kernel size, configuration, precision, channel alignment, target) the check compiles."""
    return [
        (name, kernel_size, config, precision, channel_align, target)
        for name, (_, configs) in _kernels().items()
        for kernel_size in KERNEL_SIZES[name]
        for config in configs
        for precision, (_, _, dtype, _) in PRECISIONS.items()
        if dtype in config.dtypes
        for channel_align in sorted({config.min_align, FULL_ALIGNMENT})
        for target in TARGETS
    ]


def run_checks(workers: int | None = None) -> list[CheckResult]:
    """Compile every job of :func:`jobs` (in ``workers`` processes)."""
    todo = jobs()
    workers = workers or min(len(todo), os.cpu_count() or 1)
    if workers == 1:
        return [check_one(*job) for job in todo]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(check_one, *zip(*todo, strict=True)))


def format_table(results: list[CheckResult]) -> str:
    """Markdown report: a summary per kernel, then one row per compile."""
    lines = [
        "# Triton kernels: ahead-of-time compile check (sm_90, sm_80)",
        "",
        f"Generated by `python -m tools.static_check_triton` on "
        f"{datetime.date.today().isoformat()} with triton {triton.__version__} (no GPU needed). "
        "Specialisation: channels_last, 3×3 (padding 1) and, for the forward, 1×1 (padding 0), stride 1, "
        "8×256×28×28 in 4 groups; fp32 "
        "uses IEEE `tl.dot` (torch's default), tf32 the same fp32 tensors with "
        "`torch.backends.cuda.matmul.allow_tf32`. Align = the CHANNEL_ALIGN hint (power of two dividing "
        "every channel offset; 1 = unvectorised loads). Shared = Triton's dynamic + static shared memory "
        "per block. Limits: no stack/local (spills), shared ≤ 227 KiB (sm_90) / 163 KiB (sm_80), "
        "bf16/fp16/tf32 on tensor cores (`wgmma` on sm_90, `mma` on sm_80).",
        "",
        "| kernel | configs | compiles | passing | registers (min–max) | max shared (KiB) |",
        "|---|---|---|---|---|---|",
    ]
    for kernel in dict.fromkeys(result.kernel for result in results):
        rows = [result for result in results if result.kernel == kernel]
        registers = [row.registers for row in rows]
        lines.append(
            f"| {kernel} | {len({row.config for row in rows})} | {len(rows)} | {sum(row.ok for row in rows)} | "
            f"{min(registers)}–{max(registers)} | {max(row.shared_bytes for row in rows) / 1024:.1f} |"
        )
    lines += [
        "",
        "| kernel | k×k | config (M×N×K warps stages) | precision | align | target | registers | stack B | "
        "shared KiB | warps | stages | tensor cores | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        verdict = "ok" if row.ok else "FAIL: " + "; ".join(row.problems)
        lines.append(
            f"| {row.kernel} | {row.kernel_size}×{row.kernel_size} | {row.config} | {row.precision} | "
            f"{row.channel_align} | {row.target} | {row.registers} | "
            f"{row.stack_bytes} | {row.shared_bytes / 1024:.1f} | {row.num_warps} | {row.num_stages} | "
            f"{row.tensor_core_op} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown table to write")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: all cores)")
    args = parser.parse_args(argv)
    results = run_checks(args.workers)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(format_table(results))
    failures = [row for row in results if not row.ok]
    for row in failures:
        where = f"{row.kernel} {row.kernel_size}x{row.kernel_size} {row.config} {row.precision} " + (
            f"align {row.channel_align} {row.target}"
        )
        print(f"FAIL {where}: {'; '.join(row.problems)}", file=sys.stderr)
    print(f"{len(results) - len(failures)}/{len(results)} compiles pass; table written to {args.output}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
