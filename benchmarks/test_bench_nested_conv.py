"""The nested conv benchmark as pytest-benchmark tests, for users who prefer that tool.

    pytest benchmarks/test_bench_nested_conv.py --benchmark-enable --benchmark-group-by=group

It lives beside the harness, not under ``tests/``: pyproject's ``testpaths = ["tests"]`` keeps
``make test`` from collecting it, and its addopts disable benchmarks (``--benchmark-enable``
turns them back on; without it every implementation runs once, still checked). It times the
same implementations as :mod:`benchmarks.bench_nested_conv` on a small CPU parametrisation;
that module remains the full benchmark (baselines side by side, ideals, reports).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_nested_conv import check_implementation, expected_result, implementations, make_operands
from benchmarks.shapes import Case, cpu_layers
from rdn_kernels import available_backends

CPU = torch.device("cpu")
_LAYERS = {layer.label: layer for layer in cpu_layers()}
CASES = [
    Case(_LAYERS[label], batch=8, num_groups=num_groups, dtype=torch.float32, mode=mode,
         stage=num_groups - 1 if mode == "stage" else None)
    for label in ("1x1 144→32 @28", "1x1 960→320 @7", "3x3 32→32 @28")
    for num_groups in (4, 7)
    for mode in ("forward", "stage", "backward")
]
NAMES = ("cpp", "torch", "masked dense", "per-stage loop", "dense")


@pytest.fixture(scope="module")
def operands():
    """Tensors per (layer, K), shared by every implementation and mode, with their float64 copy."""
    cache = {}

    def get(case: Case):
        key = (case.layer.label, case.num_groups)
        if key not in cache:
            ops = make_operands(case, CPU, torch.contiguous_format)
            cache[key] = (ops, ops.to(torch.float64))
        return cache[key]

    return get


def _case_id(case: Case) -> str:
    return f"{case.layer.label.replace(' ', '_').replace('→', 'to')}-K{case.num_groups}-{case.mode}"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_nested_conv(benchmark, operands, case, name):
    ops, reference_ops = operands(case)
    by_name = {impl.name: impl for impl in implementations(case, ops, available_backends(CPU))}
    if name not in by_name:
        pytest.skip(f"{name!r} does not run here or has no {case.mode} variant")
    impl = by_name[name]
    status, error = check_implementation(impl, expected_result(case, reference_ops), case.dtype)
    assert status == "ok", f"{name}: {status} (relative error {error})"
    benchmark.group = f"{case.layer.label} K={case.num_groups} {case.mode_label}"
    benchmark(impl.run)
