"""Ahead-of-time compile check of every Triton kernel configuration for sm_90 and sm_80 (no GPU).

Compiles each kernel × tile configuration × dtype for both targets and fails on register spills,
shared memory over the per-block limit, or fp16/bf16 tiles without tensor-core instructions.
Triton caches the compiled kernels (TRITON_CACHE_DIR, default ~/.triton/cache): the first run
compiles about a hundred kernels (a few minutes on two cores), later runs take seconds.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1",
    reason="the static check compiles the kernels, which TRITON_INTERPRET=1 replaces by the interpreter",
)


def test_the_table_goes_to_the_checkouts_results_folder():
    """The tool is not in the runtime package, and its default output does not depend on the current directory."""
    from tools import static_check_triton as static_check

    assert importlib.util.find_spec("rdn_kernels.nested_conv.static_check") is None
    repo = Path(__file__).resolve().parents[2]
    assert static_check.DEFAULT_OUTPUT == repo / "benchmarks" / "results" / "triton_static_check.md"


def test_every_configuration_compiles_clean_for_sm90_and_sm80(tmp_path):
    from tools import static_check_triton as static_check

    output = tmp_path / "triton_static_check.md"
    assert static_check.main(["--output", str(output)]) == 0
    table = output.read_text()
    expected = static_check.jobs()
    assert len(expected) == sum(1 for line in table.splitlines() if line.endswith("| ok |"))
    # Every kernel is there, in every precision, unaligned and aligned, for both targets.
    assert {job[:2] for job in expected} == {("forward", 3), ("forward", 1), ("grad_input", 3), ("grad_weight", 3)}
    assert {job[3:] for job in expected} >= {
        (precision, align, target)
        for precision in ("bf16", "fp16", "fp32", "tf32")
        for align in (1, 16)
        for target in ("sm_90", "sm_80")
    }


def test_every_dtype_keeps_a_configuration_for_unaligned_channels():
    """The autotuner must find a configuration for any layout: one with min_align 1 per dtype."""
    from rdn_kernels.nested_conv import triton as backend

    for configs in (backend.FORWARD_CONFIGS, backend.GRAD_INPUT_CONFIGS, backend.GRAD_WEIGHT_CONFIGS):
        for dtype in ("bfloat16", "float16", "float32"):
            assert any(dtype in config.dtypes and config.min_align == 1 for config in configs), dtype


def test_check_catches_a_spilling_tile():
    """A 128×128×64 bf16 forward tile on 4 warps needs more than 255 registers: the check must say so."""
    from rdn_kernels.nested_conv.triton import TileConfig
    from tools import static_check_triton as static_check

    result = static_check.check_one("forward", 3, TileConfig(128, 128, 64, 4, 3), "bf16", 16, "sm_90")
    assert not result.ok
    assert result.stack_bytes > 0 and any("spills" in problem for problem in result.problems)


@pytest.mark.parametrize("kernel_name", ["forward", "grad_input", "grad_weight"])
def test_unaligned_stage_and_channel_count_compile(kernel_name):
    """What the JIT specialises for a stage starting at output channel 1 (an int argument of 1
    becomes a constant) and for C = 24 channels_last (strides divisible by 8, not 16)."""
    from rdn_kernels.nested_conv import triton as backend
    from tools import static_check_triton as static_check

    configs = {"forward": backend.FORWARD_CONFIGS, "grad_input": backend.GRAD_INPUT_CONFIGS,
               "grad_weight": backend.GRAD_WEIGHT_CONFIGS}[kernel_name]  # fmt: skip
    config = next(c for c in configs if "float32" in c.dtypes and c.min_align == 1)
    for channels, channel_base in ((256, 1), (24, 0)):
        result = static_check.check_one(kernel_name, 3, config, "fp32", 1, "sm_90", channels, channel_base)
        assert result.ok, result.problems
