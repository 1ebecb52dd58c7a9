"""Output buffers: how the backends allocate them.

Allocation. Every buffer a backend hands back with uninitialised memory (an output, a gradient)
comes from :func:`empty` / :func:`empty_like` here, or from ``rdn::empty`` in the C++ extension.
A debug switch fills those buffers with a value — NaN in the tests — so that an element a
kernel forgets to write cannot pass a comparison because fresh memory happened to be zero: set
``RDN_KERNELS_FILL_UNINITIALIZED=nan`` before importing ``rdn_kernels``, or call
:func:`set_uninitialized_fill`. Only floating-point buffers are filled (integer / bool ones hold
indices and flags that kernels never leave unwritten).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from rdn_kernels import _extension

FILL_ENV = "RDN_KERNELS_FILL_UNINITIALIZED"


def _parse_fill(text: str | None) -> float | None:
    if text is None or not text.strip() or text.strip().lower() in ("0", "off", "false", "no"):
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{FILL_ENV} must be a float such as 'nan' (or unset / 'off'), got {text!r}") from None


_fill_value: float | None = None


def uninitialized_fill() -> float | None:
    """The value fresh output buffers are filled with, or None (the default: left uninitialised)."""
    return _fill_value


def set_uninitialized_fill(value: float | None) -> None:
    """Fill every output buffer the backends allocate with ``value`` (None: leave them uninitialised).

    A debugging aid that costs one pass over each output; the test suite turns it on with NaN.
    Applies to the Python backends and, when it is loaded, to the C++ extension.
    """
    global _fill_value
    if value is not None and not isinstance(value, (int, float)):
        raise TypeError(f"value must be a float or None, got {type(value).__name__}")
    _fill_value = None if value is None else float(value)
    if _extension.has_cpu_kernels():
        _extension.extension().set_uninitialized_fill(_fill_value)


def _filled(buffer: Tensor) -> Tensor:
    if _fill_value is not None and (buffer.is_floating_point() or buffer.is_complex()):
        buffer.fill_(_fill_value)
    return buffer


def empty(
    size: tuple[int, ...], *, dtype: torch.dtype, device: torch.device, memory_format=torch.contiguous_format
) -> Tensor:
    """``torch.empty`` for output buffers (filled when the debug fill is on)."""
    return _filled(torch.empty(size, dtype=dtype, device=device, memory_format=memory_format))


def empty_like(tensor: Tensor, *, memory_format=torch.preserve_format) -> Tensor:
    """``torch.empty_like`` for output buffers (filled when the debug fill is on)."""
    return _filled(torch.empty_like(tensor, memory_format=memory_format))


set_uninitialized_fill(_parse_fill(os.environ.get(FILL_ENV)))

