"""Shared test helpers: one tolerance table per dtype, and a comparison that names what differs."""

from __future__ import annotations

import torch

# (atol, rtol) against the float64 reference evaluated on the same inputs cast up.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (5e-2, 2e-2),
    torch.float16: (1e-2, 1e-2),
}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, what: str = ""
) -> None:
    atol, rtol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(
        actual.to(expected.dtype), expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}" if what else m
    )


def nan_filled_like(tensor: torch.Tensor) -> torch.Tensor:
    """A fresh buffer full of NaN: an element a kernel forgets to write cannot pass a comparison."""
    return torch.full_like(tensor, float("nan"))


def one_intra_op_thread():
    """Fixture body for packages of tiny models: one intra-op thread avoids oversubscribing a busy
    CPU and keeps CPU results reproducible run to run. (Kernel tests keep several threads, so the
    parallel paths of the kernels are exercised.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
