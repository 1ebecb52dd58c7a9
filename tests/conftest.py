"""Session-wide settings for every test package.

- Output buffers the kernels allocate start as NaN (:mod:`rdn_kernels._memory`, the idea of
  flash-linear-attention's test conftest): an element a kernel forgets to write fails the
  comparison instead of passing because fresh memory happened to be zero. Subprocesses started
  by the tests inherit it through the environment variable.
- A C++ extension that was built but does not load fails the run at once: otherwise every
  ``cpp`` test would skip and the suite would pass. (Not built at all: those tests skip.)
"""

from __future__ import annotations

import os

import pytest

from rdn_kernels import _extension, _memory


def pytest_sessionstart(session) -> None:
    try:
        _extension.check_built_extension_loads()
    except ImportError as error:
        pytest.exit(str(error), returncode=pytest.ExitCode.TESTS_FAILED)


@pytest.fixture(autouse=True, scope="session")
def nan_filled_outputs():
    previous_env, previous = os.environ.get(_memory.FILL_ENV), _memory.uninitialized_fill()
    os.environ[_memory.FILL_ENV] = "nan"
    _memory.set_uninitialized_fill(float("nan"))
    yield
    _memory.set_uninitialized_fill(previous)
    if previous_env is None:
        os.environ.pop(_memory.FILL_ENV, None)
    else:
        os.environ[_memory.FILL_ENV] = previous_env
