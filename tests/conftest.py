"""Session-wide settings for every test package.

- A C++ extension that was built but does not load fails the run at once: otherwise every
  ``cpp`` test would skip and the suite would pass. (Not built at all: those tests skip.)
"""

from __future__ import annotations

import pytest

from rdn_kernels import _extension


def pytest_sessionstart(session) -> None:
    try:
        _extension.check_built_extension_loads()
    except ImportError as error:
        pytest.exit(str(error), returncode=pytest.ExitCode.TESTS_FAILED)
