"""First-use self-check of a compiled backend against the reference, for ``backend="auto"``.

The GPU kernels (``triton``, ``cuda``) were written and compiled without a GPU at hand; until
they have passed on real hardware, ``auto`` must not send users to them on trust. So the first
time ``auto`` would pick such a backend for a (device, dtype), it runs a few small problems
through it — 1×1 and strided, padded 3×3 convolutions with uneven and empty groups, a sparse
block mask, both memory layouts, all groups and a later stage into ``out=``, forward and
backward — and compares them with the float64 reference. A backend that disagrees (or raises)
is skipped for that (device, dtype) with one warning, and ``auto`` takes the next candidate.
The verdict is cached for the process.

Which device types are checked: :data:`rdn_kernels.backends.SELF_CHECKED_DEVICE_TYPES`
(CUDA; the CPU backend is tested by CI on the machines it ships to). ``RDN_KERNELS_SELF_CHECK=0``
skips the check (trusting the kernels), e.g. once they have been verified on that GPU model.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

__all__ = ["SelfCheckFailure", "passes_self_check", "self_check"]

# (atol, rtol) against the float64 reference, per dtype of the checked call.
_TOLERANCES = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-3, 2e-3),  # TF32 may be allowed for cuDNN / tl.dot
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (8e-2, 4e-2),
}
# (in_splits, out_splits, kernel, stride, padding, block_mask, stages, channels_last, with out=)
_PROBLEMS = (
    ((8, 8, 16), (16, 8, 8), 1, 1, 0, None, None, True, False),
    ((3, 5, 0, 4), (4, 0, 6, 2), 1, 1, 0, None, (1, 3), False, True),
    ((4, 6, 6), (6, 6, 4), 3, 2, 1, ((1, 0, 0), (0, 1, 0), (1, 1, 1)), None, False, False),
    ((5, 3, 8), (8, 8, 8), 3, 1, 1, None, (1, 3), True, True),
)


class SelfCheckFailure(AssertionError):
    """A backend's result differs from the reference's on a self-check problem."""


def self_check(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """Run every self-check problem through ``backend``; raise :class:`SelfCheckFailure` on a mismatch."""
    from rdn_kernels.nested_conv import nested_conv2d  # the op calls resolve_backend, which calls this

    atol, rtol = _TOLERANCES.get(dtype, (1e-2, 1e-2))
    generator = torch.Generator().manual_seed(0)
    for in_splits, out_splits, kernel, stride, padding, mask, stages, channels_last, with_out in _PROBLEMS:
        channels, out_channels = sum(in_splits), sum(out_splits)
        x64 = torch.randn(2, channels, 9, 7, generator=generator, dtype=torch.float64)
        w64 = torch.randn(out_channels, channels, kernel, kernel, generator=generator, dtype=torch.float64)
        w64 /= (channels * kernel * kernel) ** 0.5
        b64 = torch.randn(out_channels, generator=generator, dtype=torch.float64)
        options = dict(in_splits=in_splits, out_splits=out_splits, stride=stride, padding=padding,
                       block_mask=[list(row) for row in mask] if mask else None, stages=stages)  # fmt: skip
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        leaves = [t.to(device, dtype).requires_grad_(True) for t in (x64, w64, b64)]
        leaves[0] = leaves[0].detach().contiguous(memory_format=memory_format).requires_grad_(True)
        reference = nested_conv2d(*(t.to(device) for t in (x64, w64, b64)), **options, backend="torch")
        if with_out:
            out = torch.full((2, out_channels, *reference.shape[2:]), float("nan"), device=device, dtype=dtype)
            with torch.no_grad():
                result = nested_conv2d(*leaves, **options, out=out, backend=backend)
            lo = out_splits[: stages[0]] if stages else ()
            result = result[:, sum(lo) : sum(lo) + reference.shape[1]]
        else:
            result = nested_conv2d(*leaves, **options, backend=backend)
        what = f"{kernel}x{kernel} splits {in_splits}->{out_splits} stages {stages}"
        _compare(result, reference, atol, rtol, f"forward, {what}")
        if with_out:
            continue
        upstream = torch.randn(reference.shape, generator=generator, dtype=torch.float64)
        grads = torch.autograd.grad(result, leaves, upstream.to(device, dtype))
        leaves64 = [t.to(device).requires_grad_(True) for t in (x64, w64, b64)]
        expected = torch.autograd.grad(nested_conv2d(*leaves64, **options, backend="torch"), leaves64,
                                       upstream.to(device))  # fmt: skip
        for name, got, want in zip(("input", "weight", "bias"), grads, expected, strict=True):
            _compare(got, want, atol * 4, rtol * 4, f"grad {name}, {what}")


def _compare(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    actual = actual.detach().to(torch.float64)
    scale = expected.abs().max().item() if expected.numel() else 1.0
    error = (actual - expected).abs()
    bad = ~(error <= atol * max(scale, 1.0) + rtol * expected.abs())
    if bad.any():
        raise SelfCheckFailure(f"{what}: {int(bad.sum())} of {bad.numel()} elements off (max error "
                               f"{error.nan_to_num(float('inf')).max().item():.3g})")  # fmt: skip


@functools.cache
def _verdict(backend: str, device: str, dtype: torch.dtype) -> bool:
    # Real tensors whatever the caller runs under (a fake-tensor export, a dispatch mode, autograd off),
    # in the dtype asked for (autocast would compute the checked call in its own dtype).
    from torch.utils._python_dispatch import _disable_current_modes

    try:
        with _disable_current_modes(), torch.enable_grad(), torch.autocast(torch.device(device).type, enabled=False):
            self_check(backend, torch.device(device), dtype)
    except Exception as error:  # a wrong result or a kernel that does not run: either way, not this one
        warnings.warn(
            f"rdn_kernels: backend {backend!r} failed its self-check on {device} with {dtype} ({error}); "
            "backend='auto' will not use it in this process. Please report this with your GPU model.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def passes_self_check(backend: str, device: str, dtype: torch.dtype) -> bool:
    """Whether ``backend`` matched the reference on ``device`` / ``dtype`` (checked once per process).

    Under ``torch.compile`` the answer is computed eagerly and becomes a constant of the graph.
    """
    if os.environ.get("RDN_KERNELS_SELF_CHECK", "1") == "0":
        return True
    return _verdict(backend, device, dtype)


# What torch.compiler.assume_constant_result(passes_self_check) sets, without importing Dynamo
# (0.7 s) when rdn_kernels is imported; tests/kernels/test_self_check.py compiles through it.
passes_self_check._dynamo_marked_constant = True  # type: ignore[attr-defined]
