"""The CUDA sources compile with nvcc for sm_80 / sm_90, without spills, within shared memory,
and the fp16 / bf16 kernels use tensor cores — checked without a GPU.

Compilation is cached by source hash (see :mod:`tools.static_check_cuda`), so
only the first run after an edit pays for nvcc.
"""

from __future__ import annotations

import importlib.util
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import pytest

from tools import static_check_cuda as static_check


@pytest.fixture(scope="module")
def nvcc() -> str:
    found = static_check.find_nvcc()
    if found is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME, CUDA_PATH): the CUDA compile check needs the CUDA toolkit")
    return found


@pytest.fixture(scope="module")
def compiled(nvcc) -> tuple[list[static_check.KernelResources], Future]:
    """Kernel resources, and the glue syntax check running beside the nvcc compiles (they are independent)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        glue = pool.submit(static_check.check_glue, nvcc)
        kernels = static_check.check_kernels()
        wait([glue])
    return kernels, glue


@pytest.fixture(scope="module")
def kernels(compiled) -> list[static_check.KernelResources]:
    return compiled[0]


REPO_ROOT = Path(__file__).resolve().parents[2]


def test_paths_are_the_checkouts_whatever_the_current_directory(tmp_path, monkeypatch):
    """The tool lives in the repository, not in an installed package, and finds csrc/ from its own file."""
    assert importlib.util.find_spec("rdn_kernels.nested_conv.cuda_static_check") is None
    monkeypatch.chdir(tmp_path)
    assert static_check.CUDA_SOURCE_DIR == REPO_ROOT / "csrc" / "cuda"
    assert static_check.REPORT_PATH == REPO_ROOT / "benchmarks" / "results" / "cuda_static_check.md"
    assert all(path.is_file() for path in static_check.cuda_sources())


def test_no_sources_is_an_error_not_a_pass(tmp_path, monkeypatch):
    monkeypatch.setattr(static_check, "CUDA_SOURCE_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="no CUDA sources"):
        static_check.cuda_sources()


def test_there_are_cuda_sources():
    names = {path.name for path in static_check.cuda_sources()}
    assert {"nested_pointwise_mma.cu", "nested_pointwise_simt.cu"} <= names


def test_every_source_has_kernels_for_every_target(kernels):
    for source in static_check.cuda_sources():
        targets = {row.target for row in kernels if row.source == source.name}
        assert targets == set(static_check.TARGETS), f"{source.name}: kernels compiled for {sorted(targets)}"


def test_every_dtype_has_a_kernel(kernels):
    dtypes = {row.dtype for row in kernels}
    assert {"float32", "float16", "bfloat16"} <= dtypes, f"kernels found for {sorted(dtypes)}"


def test_no_spills_no_stack(kernels):
    for row in kernels:
        assert row.spill_store_bytes == 0 and row.spill_load_bytes == 0, row
        assert row.stack_bytes == 0, row


def test_shared_memory_within_static_limit(kernels):
    for row in kernels:
        assert 0 < row.shared_bytes <= static_check.STATIC_SHARED_LIMIT, row


def test_16bit_kernels_use_tensor_cores(kernels, nvcc):
    if static_check.find_cuobjdump(nvcc) is None:
        pytest.skip("cuobjdump not found (next to nvcc, on PATH, or in triton's NVIDIA backend)")
    low_precision = [row for row in kernels if row.dtype in static_check.TENSOR_CORE_DTYPES]
    assert low_precision
    for row in low_precision:
        assert row.tensor_core_instructions, f"no HMMA instruction in {row}"


def test_violations_are_reported(kernels):
    assert static_check.violations(kernels) == []
    spilling = [
        static_check.KernelResources("x.cu", "k<__half>", "float16", "sm_90", 255, 16, 8, 8, 60 * 1024, 0)
    ]
    problems = static_check.violations(spilling)
    assert len(problems) == 4 and all("x.cu: k<__half> [float16, sm_90]" in p for p in problems), problems


def test_markdown_table_lists_every_kernel(kernels):
    text = static_check.render_markdown(kernels)
    for row in kernels:
        assert f"| `{row.kernel}` | {row.dtype} | {row.target} | {row.registers} |" in text
    assert "Violations: none." in text


def test_ptxas_log_parsing():
    log = """ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'
ptxas info    : Function properties for _Z1kv
    24 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem
ptxas info    : Compiling entry function '_Z1gv' for 'sm_90'
ptxas info    : Function properties for _Z1gv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers
"""
    parsed = static_check.parse_ptxas_log(log)
    keys = ("registers", "stack", "spill_stores", "spill_loads", "smem")
    assert parsed[("_Z1kv", "sm_90")] == dict(zip(keys, (40, 24, 8, 4, 1024), strict=True))
    assert parsed[("_Z1gv", "sm_90")] == dict(zip(keys, (8, 0, 0, 0, 0), strict=True))


def test_glue_and_bindings_compile_with_cuda(compiled):
    """The torch glue, csrc/bindings.cpp and the shared csrc/nested_conv_common.cpp under RDN_WITH_CUDA."""
    try:
        checked = compiled[1].result()
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    assert checked == ["nested_conv_cuda.cpp", "bindings.cpp", "nested_conv_common.cpp"]


def test_check_catches_stack_use_and_compile_errors(nvcc, tmp_path):
    """The pipeline end to end on small sources: a kernel storing into a local array at dynamic
    indices needs a stack frame (a violation), and a source that does not compile raises CompileError."""
    stacky = tmp_path / "stacky.cu"
    stacky.write_text(
        "template <typename T> __global__ void pick(T* data, int index) {\n"
        "  T local[64];\n"
        "  for (int j = 0; j < 64; ++j) local[j] = data[j];\n"
        "  for (int j = 0; j < 64; ++j) local[(j * index) & 63] += data[j + 64];\n"
        "  data[0] = local[index & 63];\n"
        "}\n"
        "template __global__ void pick<float>(float*, int);\n"
    )
    rows = static_check.check_kernels([stacky])
    assert {(row.kernel, row.dtype) for row in rows} == {("pick<float>", "float32")}
    assert any("stack frame" in problem for problem in static_check.violations(rows))

    broken = tmp_path / "broken.cu"
    broken.write_text("__global__ void broken() { undeclared_name = 1; }\n")
    with pytest.raises(static_check.CompileError, match="broken.cu"):
        static_check.compile_cuda_source(broken, nvcc=nvcc)
