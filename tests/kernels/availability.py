"""Which backends a kernel test can run here: skip what was not built, fail what was built but is broken."""

from __future__ import annotations

import pytest
import torch

from rdn_kernels import BackendUnavailableError, _extension
from rdn_kernels.backends import resolve_backend

# Backends served by the compiled extension.
EXTENSION_BACKENDS = ("cpp", "cuda")


def require_backend(backend: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """Skip the calling test when ``backend`` cannot run on ``device`` here, with the reason.

    A C++ extension that is built but does not load fails the test instead: skipping would let a
    broken build (an undefined symbol after a torch upgrade, say) pass the whole suite.
    """
    if backend in EXTENSION_BACKENDS:
        try:
            _extension.check_built_extension_loads()
        except ImportError as error:
            pytest.fail(str(error), pytrace=False)
    try:
        resolve_backend(backend, torch.device(device), dtype)
    except BackendUnavailableError as error:
        pytest.skip(str(error))
