"""The compiled extension (``rdn_kernels._C``) is optional: import it once, remember why not."""

from __future__ import annotations

import importlib

BUILD_COMMAND = "pip install --no-build-isolation -e .   (or: make build)"

try:
    _C = importlib.import_module("rdn_kernels._C")
    IMPORT_ERROR: str | None = None
except ImportError as error:  # not built, or built against another torch
    _C = None
    IMPORT_ERROR = str(error)


def has_cpu_kernels() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and bool(getattr(_C, "WITH_CUDA", False))


def extension():
    """The extension module, or an ImportError that says how to build it."""
    if _C is None:
        raise ImportError(
            f"the rdn_kernels C++ extension is not built or does not load ({IMPORT_ERROR}). "
            f"Build it from the repository root with: {BUILD_COMMAND}"
        )
    return _C
