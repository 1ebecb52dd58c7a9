"""Static check of the CUDA kernels in ``csrc/cuda/``, runnable on a machine without a GPU.

Every ``.cu`` file is compiled with ``nvcc`` for each target architecture (with the flags the
torch extension build uses) and its kernels are read back: registers, stack frame and spills from
``ptxas -v``, static shared memory, and the tensor-core instructions (``HMMA``) in the SASS that
``cuobjdump -sass`` prints. :func:`violations` lists what a kernel must not do: spill or use a
stack frame, exceed the static shared-memory limit, or — for float16 / bfloat16 kernels — run
without tensor cores. The torch glue (``csrc/cuda/*.cpp``) and ``csrc/bindings.cpp`` with
``RDN_WITH_CUDA`` are syntax-checked with the host compiler against this torch's headers.

Results are cached by a hash of the sources, flags and compiler version, so a second run is
instant. ``python -m tools.static_check_cuda`` (in the repository root) rewrites the committed
table ``benchmarks/results/cuda_static_check.md``; the exit status is 1 when a kernel breaks a rule.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tools import REPO_ROOT, RESULTS_DIR

CUDA_SOURCE_DIR = REPO_ROOT / "csrc" / "cuda"
REPORT_PATH = RESULTS_DIR / "cuda_static_check.md"
TARGETS = ("sm_80", "sm_90")
# Static __shared__ memory per block is capped at 48 KiB on every architecture (more needs
# dynamic shared memory and an opt-in attribute, which these kernels do not use).
STATIC_SHARED_LIMIT = 48 * 1024
# What torch.utils.cpp_extension passes to nvcc (COMMON_NVCC_FLAGS, C++ standard, -O3 from setup.py).
NVCC_FLAGS = (
    "-std=c++20",
    "-O3",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
)
# Template arguments that name a kernel's element type.
_DTYPE_OF_TEMPLATE_ARG = {"__half": "float16", "__nv_bfloat16": "bfloat16", "float": "float32"}
TENSOR_CORE_DTYPES = ("float16", "bfloat16")
_CACHE_DIR = Path(tempfile.gettempdir()) / "rdn_cuda_static_check"


class CompileError(RuntimeError):
    """A CUDA or glue source failed to compile; the message holds the compiler output."""


@dataclass(frozen=True)
class KernelResources:
    """Resources of one kernel compiled for one target."""

    source: str
    kernel: str  # demangled name with template arguments, without namespaces and parameters
    dtype: str
    target: str
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int
    tensor_core_instructions: int | None  # HMMA count in the SASS; None without cuobjdump


def find_nvcc() -> str | None:
    """``nvcc`` on PATH or under CUDA_HOME / CUDA_PATH, else None."""
    found = shutil.which("nvcc")
    if found:
        return found
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        candidate = Path(os.environ.get(variable, "")) / "bin" / "nvcc"
        if os.environ.get(variable) and candidate.is_file():
            return str(candidate)
    return None


def find_cuobjdump(nvcc: str | None = None) -> str | None:
    """``cuobjdump`` next to nvcc, on PATH, or the one bundled with triton's NVIDIA backend."""
    candidates = [Path(nvcc).with_name("cuobjdump")] if nvcc else []
    on_path = shutil.which("cuobjdump")
    if on_path:
        candidates.append(Path(on_path))
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    return next((str(path) for path in candidates if path.is_file() and os.access(path, os.X_OK)), None)


def cuda_sources() -> list[Path]:
    """Every ``csrc/cuda/*.cu`` of the checkout; an error (not an empty list) when there is none."""
    sources = sorted(CUDA_SOURCE_DIR.glob("*.cu"))
    if not sources:
        # An empty list would make every check pass vacuously.
        raise FileNotFoundError(f"no CUDA sources under {CUDA_SOURCE_DIR}: run the tool from a checkout")
    return sources


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)


def _tool_version(tool: str) -> str:
    return _run([tool, "--version"], REPO_ROOT).stdout


def _cache_key(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def _headers_digest(directory: Path) -> bytes:
    return b"".join(path.name.encode() + path.read_bytes() for path in sorted(directory.glob("*.h*")))


def compile_cuda_source(source: Path, targets: tuple[str, ...] = TARGETS, nvcc: str | None = None) -> tuple[Path, str]:
    """Compile ``source`` (host and device code, one SASS per target) to an object file.

    Returns (object path, ptxas ``-v`` log). Raises :class:`CompileError` on failure.
    """
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (PATH, CUDA_HOME, CUDA_PATH)")
    gencode = [f"-gencode=arch=compute_{t[3:]},code={t}" for t in targets]
    command = [nvcc, "-c", *NVCC_FLAGS, *gencode, "-Xptxas", "-v", "-Xcompiler", "-Wall"]
    headers = _headers_digest(source.parent) + _headers_digest(source.parent.parent)  # csrc/cuda and csrc
    key = _cache_key(source.read_bytes(), headers, " ".join(command[1:]), _tool_version(nvcc))
    entry = _CACHE_DIR / f"{source.stem}-{key}"
    obj, log = entry / f"{source.stem}.o", entry / "ptxas.log"
    if obj.is_file() and log.is_file():
        return obj, log.read_text()
    entry.mkdir(parents=True, exist_ok=True)
    # Written under per-process names and renamed into place, object last: concurrent or interrupted
    # runs never leave a half-written cache entry.
    partial_obj, partial_log = (entry / f"{name}.{os.getpid()}.partial" for name in (obj.name, log.name))
    result = _run([*command, "-o", str(partial_obj), str(source)], source.parent)
    if result.returncode != 0:
        raise CompileError(f"nvcc failed on {source.name}:\n{result.stdout}{result.stderr}")
    partial_log.write_text(result.stdout + result.stderr)
    partial_log.replace(log)
    partial_obj.replace(obj)
    return obj, log.read_text()


_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<target>sm_\d+a?)'")
_PROPERTIES = re.compile(r"Function properties for (?P<name>\S+)")
_FRAME = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads"
)
_USAGE = re.compile(r"Used (?P<registers>\d+) registers")
_SMEM = re.compile(r"(?P<smem>\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[tuple[str, str], dict[str, int]]:
    """{(mangled kernel, target): {registers, stack, spill_stores, spill_loads, smem}} of every entry function."""
    kernels: dict[tuple[str, str], dict[str, int]] = {}
    current: tuple[str, str] | None = None
    properties_of: str | None = None
    for line in log.splitlines():
        if match := _ENTRY.search(line):
            current = (match["name"], match["target"])
            kernels[current] = {"registers": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0}
        elif match := _PROPERTIES.search(line):
            properties_of = match["name"]
        elif (match := _FRAME.search(line)) and current and properties_of == current[0]:
            kernels[current].update(
                stack=int(match["stack"]), spill_stores=int(match["stores"]), spill_loads=int(match["loads"])
            )
        elif (match := _USAGE.search(line)) and current:
            smem = _SMEM.search(line)
            kernels[current].update(registers=int(match["registers"]), smem=int(smem["smem"]) if smem else 0)
    return kernels


def count_tensor_core_instructions(obj: Path, cuobjdump: str) -> dict[tuple[str, str], int]:
    """{(mangled kernel, target): number of HMMA instructions in its SASS}."""
    result = _run([cuobjdump, "-sass", str(obj)], obj.parent)
    if result.returncode != 0:
        raise CompileError(f"cuobjdump -sass failed on {obj.name}:\n{result.stderr}")
    counts: dict[tuple[str, str], int] = {}
    target, function = None, None
    for line in result.stdout.splitlines():
        if match := re.match(r"\s*arch = (sm_\d+a?)", line):
            target = match[1]
        elif match := re.match(r"\s*Function : (\S+)", line):
            function = match[1]
            counts[(function, target)] = 0
        elif function and re.search(r"\bHMMA\.", line):
            counts[(function, target)] += 1
    return counts


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if filt is None or not names:
        return {name: name for name in names}
    result = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, result.stdout.splitlines(), strict=True))


def _short_name_and_dtype(demangled: str) -> tuple[str, str]:
    # "void rdn::cuda::(anonymous namespace)::kernel<__half, true>(rdn::cuda::PointwiseProblem)"
    match = re.search(r"(\w+)(<[^()]*>)?\(", demangled)
    if match is None:
        return demangled, "?"
    arguments = [arg.strip() for arg in (match[2] or "<>")[1:-1].split(",")]
    dtype = next((_DTYPE_OF_TEMPLATE_ARG[arg] for arg in arguments if arg in _DTYPE_OF_TEMPLATE_ARG), "?")
    return match[1] + (match[2] or ""), dtype


def check_kernels(sources: list[Path] | None = None, targets: tuple[str, ...] = TARGETS) -> list[KernelResources]:
    """Compile ``sources`` (default: every ``csrc/cuda/*.cu``) in parallel and read every kernel's resources."""
    sources = cuda_sources() if sources is None else sources
    nvcc = find_nvcc()
    cuobjdump = find_cuobjdump(nvcc)
    with ThreadPoolExecutor(max_workers=max(1, len(sources))) as pool:
        compiled = list(pool.map(lambda source: compile_cuda_source(source, targets, nvcc), sources))
    rows = []
    for source, (obj, log) in zip(sources, compiled, strict=True):
        usage = parse_ptxas_log(log)
        tensor_cores = count_tensor_core_instructions(obj, cuobjdump) if cuobjdump else {}
        names = _demangle(sorted({name for name, _ in usage}))
        for (name, target), resources in sorted(usage.items()):
            kernel, dtype = _short_name_and_dtype(names[name])
            rows.append(
                KernelResources(
                    source=source.name,
                    kernel=kernel,
                    dtype=dtype,
                    target=target,
                    registers=resources["registers"],
                    stack_bytes=resources["stack"],
                    spill_store_bytes=resources["spill_stores"],
                    spill_load_bytes=resources["spill_loads"],
                    shared_bytes=resources["smem"],
                    tensor_core_instructions=tensor_cores.get((name, target)) if cuobjdump else None,
                )
            )
    return rows


def violations(rows: list[KernelResources]) -> list[str]:
    """Every broken rule, one line each; empty when all kernels pass."""
    problems = []
    for row in rows:
        where = f"{row.source}: {row.kernel} [{row.dtype}, {row.target}]"
        if row.spill_store_bytes or row.spill_load_bytes:
            problems.append(
                f"{where} spills registers ({row.spill_store_bytes} B stored, {row.spill_load_bytes} B loaded)"
            )
        if row.stack_bytes:
            problems.append(f"{where} uses a {row.stack_bytes} B stack frame")
        if row.shared_bytes > STATIC_SHARED_LIMIT:
            problems.append(f"{where} uses {row.shared_bytes} B static shared memory > {STATIC_SHARED_LIMIT} B")
        if row.dtype == "?":
            problems.append(f"{where} has no element type among its template arguments")
        if row.dtype in TENSOR_CORE_DTYPES and row.tensor_core_instructions == 0:
            problems.append(f"{where} has no tensor-core (HMMA) instruction")
    return problems


def _torch_include_dirs() -> list[Path]:
    from torch.utils.cpp_extension import include_paths

    return [Path(path) for path in include_paths()]


def _cuda_include_dirs(nvcc: str) -> list[Path]:
    # nvcc may be a wrapper script: ask it where its headers are rather than guess from its path.
    result = _run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], REPO_ROOT)
    found = re.findall(r'^#\$ (?:SYSTEM_)?INCLUDES="?(.*)$', result.stderr, flags=re.MULTILINE)
    return [Path(path) for line in found for path in re.findall(r'"?-(?:I|isystem)"?\s*"?([^"\s]+)', line)]


def check_glue(nvcc: str | None = None) -> list[str]:
    """Syntax-check the torch glue (``csrc/cuda/*.cpp``) and ``csrc/bindings.cpp`` with CUDA on.

    Returns the checked file names; raises :class:`CompileError` on the first failure. A CPU
    build of torch ships the c10/cuda headers but not ``c10/cuda/impl/cuda_cmake_macros.h``, which
    CMake generates for CUDA builds; an equivalent one-line header stands in for it.
    """
    import torch

    nvcc = nvcc or find_nvcc()
    compiler = shutil.which("c++") or shutil.which("g++")
    if nvcc is None or compiler is None:
        raise FileNotFoundError("the glue check needs nvcc (for the CUDA headers) and a host C++ compiler")
    if not any((path / "c10" / "cuda" / "CUDAGuard.h").is_file() for path in _torch_include_dirs()):
        raise FileNotFoundError("this torch ships no c10/cuda headers to check the glue against")
    stub_dir = _CACHE_DIR / "stub_include"
    stub = stub_dir / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub_text = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"
    if not stub.is_file() or stub.read_text() != stub_text:  # written once, atomically: runs may overlap
        stub.parent.mkdir(parents=True, exist_ok=True)
        partial = stub.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(stub_text)
        partial.replace(stub)
    includes = [*_torch_include_dirs(), *_cuda_include_dirs(nvcc), stub_dir, Path(sysconfig.get_paths()["include"])]
    base = [compiler, "-std=c++20", "-fsyntax-only", "-DRDN_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C"]
    base += [f"-isystem{path}" for path in includes]
    csrc = REPO_ROOT / "csrc"
    files = [*sorted(CUDA_SOURCE_DIR.glob("*.cpp")), csrc / "bindings.cpp", csrc / "nested_conv_common.cpp"]
    headers = _headers_digest(CUDA_SOURCE_DIR) + _headers_digest(csrc / "cpu") + _headers_digest(csrc)

    def check(path: Path) -> str:
        key = _cache_key(path.read_bytes(), headers, " ".join(base), torch.__version__, _tool_version(compiler))
        marker = _CACHE_DIR / f"glue-{path.stem}-{key}.ok"
        if not marker.is_file():
            result = _run([*base, str(path)], path.parent)
            if result.returncode != 0:
                raise CompileError(f"{path.name} does not compile with RDN_WITH_CUDA:\n{result.stderr}")
            marker.touch()
        return path.name

    with ThreadPoolExecutor(max_workers=len(files)) as pool:
        return list(pool.map(check, files))


def render_markdown(rows: list[KernelResources], nvcc: str | None = None) -> str:
    """The kernel × dtype × target table with the toolchain and date it was made with."""
    nvcc = nvcc or find_nvcc()
    releases = [line for line in _tool_version(nvcc).splitlines() if "release" in line] if nvcc else []
    version = releases[0].strip() if releases else "unknown version"
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    lines = [
        "# Static check of the CUDA kernels",
        "",
        f"Compiled with `nvcc` ({version}) on {today}, no GPU involved: `{' '.join(NVCC_FLAGS)}`.",
        "Registers, stack and spills from `ptxas -v`; shared memory is static per block (limit "
        f"{STATIC_SHARED_LIMIT} B); tensor-core instructions are the `HMMA` count in `cuobjdump -sass`.",
        "Regenerate with `python -m tools.static_check_cuda`. This is a static check only: "
        "correctness on a GPU is `pytest -m cuda tests/kernels/test_nested_conv_cuda.py`.",
        "",
        "| source | kernel | dtype | target | registers | stack (B) | spill st/ld (B) | smem (B) | HMMA |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        tensor_cores = "n/a" if row.tensor_core_instructions is None else str(row.tensor_core_instructions)
        lines.append(
            f"| {row.source} | `{row.kernel}` | {row.dtype} | {row.target} | {row.registers} | {row.stack_bytes} | "
            f"{row.spill_store_bytes}/{row.spill_load_bytes} | {row.shared_bytes} | {tensor_cores} |"
        )
    problems = violations(rows)
    lines += ["", "Violations: " + ("none." if not problems else ""), *[f"- {p}" for p in problems]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPORT_PATH, help="markdown table to write")
    args = parser.parse_args(argv)
    rows = check_kernels()
    checked = check_glue()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render_markdown(rows))
    print(args.output.read_text())
    print(f"glue syntax-checked with RDN_WITH_CUDA: {', '.join(checked)}")
    return 1 if violations(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
