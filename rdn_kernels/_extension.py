"""The compiled extension (``rdn_kernels._C``) is optional: import it once, remember why not.

Two ways to be without it must not be confused: *not built* (no ``_C*.so`` next to the package;
the ``cpp`` / ``cuda`` backends are simply unavailable) and *built but broken* (a ``_C*.so`` is
there but does not import, e.g. an undefined symbol after a torch upgrade). :func:`status` tells
them apart; the test suite fails on a broken build (:func:`check_built_extension_loads`) instead
of skipping every C++ test.
"""

from __future__ import annotations

import importlib
import importlib.machinery
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

BUILD_COMMAND = "pip install --no-build-isolation -e .   (or: make build)"
MODULE_NAME = "rdn_kernels._C"
PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ExtensionState:
    """The outcome of importing the extension once."""

    module: ModuleType | None
    import_error: str | None
    built_paths: tuple[Path, ...]  # compiled files found next to the package

    @property
    def status(self) -> str:
        """``"loaded"``, ``"not built"`` or ``"broken"`` (built, but the import failed)."""
        if self.module is not None:
            return "loaded"
        return "broken" if self.built_paths else "not built"


def built_extension_paths(package_dir: Path = PACKAGE_DIR, stem: str = "_C") -> tuple[Path, ...]:
    """Compiled extension files ``<stem>.*.so`` / ``.pyd`` in ``package_dir``, for any Python or
    platform tag: a file built for another interpreter counts as built (and then as broken)."""
    suffixes = {suffix.rsplit(".", 1)[-1] for suffix in importlib.machinery.EXTENSION_SUFFIXES} | {"so", "pyd"}
    return tuple(sorted(path for path in package_dir.glob(f"{stem}.*") if path.suffix.removeprefix(".") in suffixes))


def load(module_name: str = MODULE_NAME, package_dir: Path = PACKAGE_DIR) -> ExtensionState:
    """Import ``module_name`` (a compiled module living in ``package_dir``) and record the outcome."""
    built = built_extension_paths(package_dir, module_name.rpartition(".")[2])
    try:
        return ExtensionState(importlib.import_module(module_name), None, built)
    except ImportError as error:  # not built, or built against another torch / Python
        return ExtensionState(None, str(error), built)


_STATE = load()


def state() -> ExtensionState:
    return _STATE


def status() -> str:
    """``"loaded"``, ``"not built"`` or ``"broken"``; see :class:`ExtensionState`."""
    return _STATE.status


def check_built_extension_loads(extension_state: ExtensionState | None = None) -> None:
    """Raise ImportError when a built extension does not load (a missing one is fine)."""
    extension_state = extension_state or _STATE
    if extension_state.status == "broken":
        files = ", ".join(str(path) for path in extension_state.built_paths)
        raise ImportError(
            f"the rdn_kernels C++ extension is built ({files}) but does not load: "
            f"{extension_state.import_error}. Rebuild it from the repository root with: {BUILD_COMMAND}"
        )


def has_cpu_kernels() -> bool:
    return _STATE.module is not None


def has_cuda_kernels() -> bool:
    return _STATE.module is not None and bool(getattr(_STATE.module, "WITH_CUDA", False))


def extension() -> ModuleType:
    """The extension module, or an ImportError that says how to build it."""
    if _STATE.module is None:
        what = "is built but does not load" if _STATE.status == "broken" else "is not built"
        raise ImportError(
            f"the rdn_kernels C++ extension {what} ({_STATE.import_error}). "
            f"Build it from the repository root with: {BUILD_COMMAND}"
        )
    return _STATE.module
