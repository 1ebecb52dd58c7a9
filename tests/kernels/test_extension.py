"""The compiled extension: a build that does not load fails the tests, a missing build skips them."""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

import pytest

from rdn_kernels import _extension
from tests import conftest
from tests.kernels.availability import require_backend


def test_built_extension_loads():
    """Fails (with the import error) when a rdn_kernels/_C*.so exists but does not import."""
    _extension.check_built_extension_loads()
    assert _extension.status() in ("loaded", "not built")


def _fake_package(root: Path, name: str, extension_bytes: bytes | None) -> Path:
    """A package ``name`` under ``root``, with a file named like a compiled ``_C`` when bytes are given."""
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    if extension_bytes is not None:
        (package / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(extension_bytes)
    return package


@pytest.fixture
def broken_state(tmp_path, monkeypatch) -> _extension.ExtensionState:
    """The state of an extension whose built file does not load (garbage instead of a shared object)."""
    name = f"rdn_fake_broken_{tmp_path.name}"
    package = _fake_package(tmp_path, name, b"not a shared object")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return _extension.load(f"{name}._C", package)


def test_garbage_extension_is_broken_not_missing(broken_state):
    assert broken_state.status == "broken"
    assert broken_state.module is None and broken_state.import_error
    with pytest.raises(ImportError, match="built .* but does not load"):
        _extension.check_built_extension_loads(broken_state)


def test_missing_extension_is_not_built(tmp_path, monkeypatch):
    name = f"rdn_fake_missing_{tmp_path.name}"
    package = _fake_package(tmp_path, name, None)
    monkeypatch.syspath_prepend(str(tmp_path))
    state = _extension.load(f"{name}._C", package)
    assert state.status == "not built" and state.built_paths == ()
    _extension.check_built_extension_loads(state)  # nothing to complain about


def test_extension_for_another_python_counts_as_built(tmp_path):
    (tmp_path / "_C.cpython-299-x86_64-linux-gnu.so").write_bytes(b"")
    (tmp_path / "_C.txt").write_text("")
    assert [path.name for path in _extension.built_extension_paths(tmp_path)] == ["_C.cpython-299-x86_64-linux-gnu.so"]


def test_broken_extension_fails_the_session_and_the_backend_tests(broken_state, monkeypatch):
    monkeypatch.setattr(_extension, "_STATE", broken_state)
    assert _extension.status() == "broken" and not _extension.has_cpu_kernels()
    with pytest.raises(pytest.exit.Exception, match="does not load"):
        conftest.pytest_sessionstart(session=None)
    with pytest.raises(pytest.fail.Exception, match="does not load"):
        require_backend("cpp")
    with pytest.raises(ImportError, match="built but does not load"):
        _extension.extension()
    require_backend("torch")  # the reference never needs the extension
