"""Operands in strided forms (views of larger tensors) give the reference's result on every backend.

Runs in plain pytest for ``torch`` and ``cpp`` and in the TRITON_INTERPRET=1 subprocess for
``triton`` (listed in test_nested_conv_triton.INTERPRETER_FILES).
"""

from __future__ import annotations

import pytest
import torch

from rdn_kernels import nested_conv2d
from tests.kernels.availability import require_backend
from tests.utils import assert_close

BACKENDS = ["torch", "cpp", "triton"]
CONV = dict(in_splits=(2, 3), out_splits=(3, 2), padding=1)


def _strided(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A float64 view with every-other-element strides along its first dimension."""
    full = torch.randn(2 * shape[0], *shape[1:], generator=generator, dtype=torch.float64)
    return full[::2]


@pytest.mark.parametrize("strided", ["bias", "weight", "input"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_operands_read_correctly(backend, strided):
    require_backend(backend)
    generator = torch.Generator().manual_seed(0)
    shapes = {"input": (2, 5, 5, 6), "weight": (5, 5, 3, 3), "bias": (5,)}
    operands = {
        name: _strided(shape, generator) if name == strided else torch.randn(shape, generator=generator,
                                                                             dtype=torch.float64)
        for name, shape in shapes.items()
    }  # fmt: skip
    assert not operands[strided].is_contiguous()
    expected = nested_conv2d(*(operands[name].contiguous() for name in shapes), **CONV, backend="torch")
    for stages in (None, (1, 2)):
        actual = nested_conv2d(*(operands[name] for name in shapes), **CONV, stages=stages, backend=backend)
        offset = 0 if stages is None else CONV["out_splits"][0]
        assert_close(actual, expected[:, offset : offset + actual.shape[1]], what=f"{strided} strided, {stages}")
