"""Output buffers: how the backends allocate them, and the aliasing checks of ``out=``.

Allocation. Every buffer a backend hands back with uninitialised memory (an output, a gradient)
comes from :func:`empty` / :func:`empty_like` here, or from ``rdn::empty`` in the C++ extension.
A debug switch fills those buffers with a value — NaN in the tests — so that an element a
kernel forgets to write cannot pass a comparison because fresh memory happened to be zero: set
``RDN_KERNELS_FILL_UNINITIALIZED=nan`` before importing ``rdn_kernels``, or call
:func:`set_uninitialized_fill`. Only floating-point buffers are filled (integer / bool ones hold
indices and flags that kernels never leave unwritten).

Aliasing. :func:`has_internal_overlap` and :func:`overlaps` decide, exactly, whether a written
tensor has two elements at one address, or shares an address with a tensor read. They follow
``at::has_internal_overlap`` / ``at::get_overlap_status`` for the cheap cases (distinct memory,
dense tensors) and, where ATen answers "too hard" (non-dense views of one buffer whose address
ranges interleave, such as disjoint channel slices of one feature map), decide from the
addresses themselves instead of letting a possible overlap through.
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


# ----------------------------------------------------------------------------------------------
# Aliasing
# ----------------------------------------------------------------------------------------------


def _is_contiguous(tensor: Tensor) -> bool:
    """Contiguous or channels_last: the common layouts, dense (checked first: out= runs per stage)."""
    return tensor.is_contiguous() or (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last))


def _span(tensor: Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte) that ``tensor`` addresses; (0, 0) when it has no elements."""
    if tensor.is_contiguous():  # the usual case, first: out= runs on every stage of a layer
        start = tensor.data_ptr()
        return (start, start + tensor.nbytes) if tensor.nbytes else (0, 0)
    numel = tensor.numel()
    if numel == 0:
        return 0, 0
    start = tensor.data_ptr()
    if not _is_contiguous(tensor):
        numel = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True)) + 1
    return start, start + numel * tensor.element_size()


def _sorted_dims(tensor: Tensor) -> list[tuple[int, int]]:
    """(stride, size) of the dimensions of size > 1, smallest stride first."""
    return sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride(), strict=True) if size > 1)


def _is_non_overlapping_and_dense(tensor: Tensor) -> bool:
    """Some permutation of the dimensions makes ``tensor`` contiguous: it covers its address range exactly."""
    expected = 1
    for stride, size in _sorted_dims(tensor):
        if stride != expected:
            return False
        expected *= size
    return True


def has_internal_overlap(tensor: Tensor) -> bool:
    """True when two elements of ``tensor`` share a memory location (an expanded tensor, say)."""
    if _is_contiguous(tensor):
        return False
    dims = _sorted_dims(tensor)
    if tensor.numel() == 0 or not dims:
        return False
    if dims[0][0] == 0:  # a broadcast (expanded) dimension
        return True
    # Sorted by stride, each stride clearing the extent of the smaller ones: nested, no overlap.
    if all(dims[k][0] >= dims[k - 1][0] * dims[k - 1][1] for k in range(1, len(dims))):
        return False
    # An exotic as_strided layout: count the offsets (rare, so the O(numel) cost is fine).
    offsets = torch.arange(sum((size - 1) * stride for stride, size in dims) + 1).as_strided(
        tensor.shape, tensor.stride()
    )
    return bool(torch.bincount(offsets.flatten()).max() > 1)


def overlaps(written: Tensor, read: Tensor) -> bool:
    """True when some element of ``written`` shares a memory location with an element of ``read``.

    ``written`` must not overlap itself (see :func:`has_internal_overlap`); ``read`` may.
    """
    written_start, written_end = _span(written)
    read_start, read_end = _span(read)
    if written_start >= read_end or read_start >= written_end:  # also: either is empty
        return False
    if written is read or all(_is_contiguous(t) or _is_non_overlapping_and_dense(t) for t in (written, read)):
        return True  # dense tensors cover their whole address range
    # Non-dense views of one buffer with interleaved addresses (e.g. disjoint channel slices):
    # mark the addresses ``written`` covers on a map of the shared range and look up ``read``'s.
    # The map is in elements when the two are element-aligned, else in bytes.
    item = written.element_size()
    unit = item if read.element_size() == item and (written_start - read_start) % item == 0 else 1
    base = min(written_start, read_start)
    marks = torch.zeros((max(written_end, read_end) - base) // unit, dtype=torch.bool)

    def addresses(tensor: Tensor, start: int) -> Tensor:
        size, stride, itemsize = tuple(tensor.shape), tensor.stride(), tensor.element_size()
        if unit != itemsize:  # in bytes: one more dimension for the bytes of each element
            size, stride = (*size, itemsize), (*(s * itemsize for s in stride), 1)
        return marks.as_strided(size, stride, (start - base) // unit)

    addresses(written, written_start).fill_(True)
    return bool(addresses(read, read_start).any())


def _has_addresses(tensor: Tensor) -> bool:
    return (type(tensor) is Tensor or type(tensor) is torch.nn.Parameter) and not tensor.is_meta


def check_out_aliasing(out: Tensor, operands: dict[str, Tensor | None]) -> None:
    """ValueError, as PyTorch's own ``out=`` ops refuse them, when ``out`` overlaps itself or any operand.

    Skipped while tracing and for tensors without real addresses (fake, meta or other subclasses).
    """
    if torch.compiler.is_compiling() or not _has_addresses(out):
        return
    if _extension.has_cpu_kernels():
        # The usual case, disjoint buffers, proven in C++ (about 0.3 µs against 2.5 µs here, on
        # every stage of every layer); anything it cannot prove is decided exactly below.
        try:
            if _extension.extension().out_provably_disjoint(out, tuple(operands.values())):
                return
        except RuntimeError:  # an operand without a data pointer (a subclass): decided below
            pass
    if has_internal_overlap(out):
        raise ValueError(
            f"out has elements that share a memory location (shape {tuple(out.shape)}, strides {out.stride()}, "
            "e.g. an expanded tensor); a written buffer must not overlap itself: pass out.clone() or a fresh buffer"
        )
    out_start, out_end = _span(out)
    for name, tensor in operands.items():
        if tensor is None or not _has_addresses(tensor):
            continue
        start, end = _span(tensor)
        if start >= out_end or out_start >= end:
            continue  # disjoint address ranges, the usual case: decided without overlaps()
        if overlaps(out, tensor):
            raise ValueError(
                f"out overlaps {name} in memory (the same tensor, or views of one buffer sharing elements); "
                f"the kernels would overwrite {name} while reading it. Pass a separate out buffer or {name}.clone()"
            )
