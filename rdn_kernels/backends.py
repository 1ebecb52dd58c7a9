"""The one place that decides which backend runs an op.

``torch`` is the pure-PyTorch reference (always there), ``cpp`` the C++ CPU kernels of the
extension, ``triton`` the fused Triton kernels (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``), ``cuda`` the CUDA kernels of the extension.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable

import torch

from rdn_kernels import _extension

KNOWN_BACKENDS = ("torch", "cpp", "triton", "cuda")
# Dtypes each compiled backend has kernels for; the reference takes any floating dtype.
_CPP_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BACKEND_DTYPES = {"cpp": _CPP_DTYPES, "cuda": _CUDA_DTYPES}
# Device types on which ``auto`` takes a compiled backend only after it passed a self-check
# against the reference there (rdn_kernels.nested_conv.self_check): the GPU kernels were built
# without a GPU and have not yet run on one.
SELF_CHECKED_DEVICE_TYPES = frozenset({"cuda"})


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here."""


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: CUDA when present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    names = ["torch"]
    if device.type == "cpu":
        if _extension.has_cpu_kernels():
            names.append("cpp")
        if _triton_importable() and triton_interpreted():
            names.append("triton")
    elif device.type == "cuda":
        if _triton_importable() and not triton_interpreted():
            names.append("triton")
        if _extension.has_cuda_kernels():
            names.append("cuda")
    return names


def _why_unavailable(name: str, device: torch.device) -> str:
    if name in ("cpp", "cuda") and not _extension.has_cpu_kernels():
        if _extension.status() == "broken":
            return (
                f"the C++ extension is built but does not load ({_extension.state().import_error}): "
                f"rebuild it with `{_extension.BUILD_COMMAND}`"
            )
        return f"the C++ extension is not built: build it with `{_extension.BUILD_COMMAND}`"
    if name == "triton":
        if not _triton_importable():
            return "triton is not installed"
        if device.type == "cpu":
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        return "Triton is in interpreter mode (TRITON_INTERPRET=1), which takes CPU tensors"
    if name == "cuda":
        return "the extension was built without CUDA kernels (needs torch with CUDA and nvcc)"
    return "it does not run on this device"


def cudnn_conv_allows_tf32() -> bool:
    """Whether torch lets cuDNN convolutions compute float32 in TF32, which the GPU backends follow.

    ``torch.backends.cudnn.conv.fp32_precision`` (torch ≥ 2.9) when torch has it: reading the
    legacy ``torch.backends.cudnn.allow_tf32`` raises once the legacy and the per-operator settings
    disagree (after ``torch.backends.cudnn.conv.fp32_precision = "ieee"``, say). The CUDA extension
    asks the same question in C++ (``cudnn_conv_allows_tf32`` in ``csrc/cuda/nested_conv_cuda.cpp``).
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    precision = getattr(conv, "fp32_precision", None)
    if isinstance(precision, str):
        return precision == "tf32"
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # the two APIs disagree and this torch cannot say which holds: exact fp32
        return False


def supported_dtypes(backend: str) -> tuple[torch.dtype, ...] | None:
    """The dtypes ``backend`` has kernels for; ``None``: any floating dtype."""
    return _BACKEND_DTYPES.get(backend)


def auto_candidates(device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    """What ``auto`` tries on ``device`` for ``dtype``, fastest first; the reference always last."""
    if device.type == "cpu":
        # Never the interpreted Triton: it is a debugging aid, far slower than the reference. Asked
        # directly rather than through available_backends: this runs on every call of an op.
        return ("cpp", "torch") if dtype in _CPP_DTYPES and _extension.has_cpu_kernels() else ("torch",)
    available = available_backends(device)
    compiled = [name for name in ("cuda", "triton") if name in available and
                dtype in (supported_dtypes(name) or (dtype,))]  # fmt: skip
    return (*compiled, "torch")


def resolve_backend(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    verify: Callable[[str, str, torch.dtype], bool] | None = None,
) -> str:
    """Map ``name`` (``"auto"`` or a backend) to a backend that can run this call.

    ``verify(backend, device, dtype)``: for ``auto`` on :data:`SELF_CHECKED_DEVICE_TYPES`, a
    compiled backend is taken only when it returns True (the op passes its self-check); a backend
    asked for by name is used as asked.
    """
    if device.type == "cpu" and dtype in _CPP_DTYPES and _extension.has_cpu_kernels() and (
        name == "cpp" or (name == "auto" and "cpu" not in SELF_CHECKED_DEVICE_TYPES)
    ):
        return "cpp"  # what the general path below answers for the usual CPU call, at a fifth of its cost
    if not isinstance(name, str) or (name != "auto" and name not in KNOWN_BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {list(KNOWN_BACKENDS)}, got {name!r}")
    if name == "auto":
        checked = verify is not None and device.type in SELF_CHECKED_DEVICE_TYPES
        for candidate in auto_candidates(device, dtype):
            if candidate == "torch" or not checked or verify(candidate, str(device), dtype):
                return candidate
    available = available_backends(device)
    if name not in available:
        raise BackendUnavailableError(
            f"backend {name!r} is not available for {device.type} tensors "
            f"({_why_unavailable(name, device)}); available: {available}"
        )
    supported = supported_dtypes(name)
    if supported is not None and dtype not in supported:
        raise TypeError(
            f"backend {name!r} supports dtypes {[str(d) for d in supported]}, got {dtype}; "
            "use backend='torch' or 'auto' for other dtypes"
        )
    return name
