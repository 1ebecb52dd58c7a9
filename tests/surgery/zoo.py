"""timm and torchvision for the surgery coverage tests: imported once, here, or the test is skipped.

Neither is a dependency of ``rdn`` (library code never imports them); ``make install`` adds both
with ``--no-deps`` (timm 1.0.31, torchvision 0.28.0: the releases matched to the pinned torch).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import pytest
import torch

_shim: torch.library.Library | None = None


def _define_missing_torchvision_ops() -> None:
    """Declare ``torchvision::nms`` and ``torchvision::qnms`` when no library has.

    Why: the torchvision wheel on PyPI is built against CUDA torch, so its C++ ops
    (``torchvision/_C.so``) do not load beside the CPU torch used here. Its
    ``_meta_registrations.py`` then registers fake kernels for these two ops without checking that
    they exist (every other registration there is guarded), and ``import torchvision`` fails with
    ``operator torchvision::nms does not exist``. Declaring the two schemas lets the import go on;
    the tests build models only (no detection op ever runs). The Library object must stay alive.
    """
    global _shim
    if _shim is not None:
        return
    try:
        torch.ops.torchvision.nms.default  # noqa: B018 - the lookup is the check
        return  # the real ops loaded
    except (AttributeError, RuntimeError):
        pass
    _shim = torch.library.Library("torchvision", "DEF")
    _shim.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _shim.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def _import(name: str) -> ModuleType:
    if importlib.util.find_spec("torchvision") is None or importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed (make install adds timm and torchvision with --no-deps)")
    _define_missing_torchvision_ops()
    try:
        return importlib.import_module(name)
    except ImportError as error:
        pytest.skip(f"{name} cannot be imported here ({error})")


def torchvision() -> ModuleType:
    """The ``torchvision`` module (the test is skipped where it is not installed)."""
    return _import("torchvision")


def timm() -> ModuleType:
    """The ``timm`` module (the test is skipped where timm or torchvision is not installed)."""
    return _import("timm")
