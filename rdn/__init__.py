"""rdn: Russian doll networks — nested modules, base models and the tools built on them.

Kernels live in :mod:`rdn_kernels`; this package only builds upward from them. Sub-packages are
imported lazily (``rdn.nn``, ``rdn.models``, ...) so ``import rdn`` stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("nn", "models", "surgery", "data", "train", "order", "policy", "inference", "config", "files",
               "errors", "steps", "deploy", "early_exit", "export", "experiments", "pipeline", "cli")

# Public names re-exported at top level, mapped to the module that defines them.
_ATTRIBUTES: dict[str, str] = {"nest": "rdn.surgery", "NestConfig": "rdn.surgery", "RussianDollNet": "rdn.surgery",
                               "EarlyExitModel": "rdn.early_exit"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _ATTRIBUTES:
        return getattr(importlib.import_module(_ATTRIBUTES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES, *_ATTRIBUTES})
