"""Files of a run: atomic writes and the run folder a job owns while it runs.

- :func:`atomic_write`: a file exists either complete or not at all (a temporary file in the same
  folder, fsync-ed, then renamed over the target), so a job killed while writing leaves the
  previous version intact.
- :func:`load_torch_data`: a ``torch.save``-d file read as data: only PyTorch's weights-only
  unpickler runs, and a file referring to any other Python object is refused before unpickling.
- :class:`RunFolder`: a job's output folder, checked before any work starts (it can be created
  and written), refused when it already holds a run the job would overwrite, and locked for the
  job's lifetime so that a second writer (another launch, a stray ``torchrun`` worker) gets a
  clear error instead of silently mixing two runs.

The lock is an advisory ``flock`` on ``<folder>/.lock``: the operating system releases it when
the process dies, so a killed run never leaves a stale lock behind. It is re-entrant within one
process (the CLI holds a folder and the training loop it calls takes it again).
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import socket
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "LOCK_NAME",
    "RunFolder",
    "RunFolderError",
    "UnsafeFileError",
    "atomic_write",
    "load_torch_data",
    "write_json",
]

LOCK_NAME = ".lock"


class RunFolderError(RuntimeError):
    """A run folder that cannot be used: not writable, holding another run, or in use by another process."""


class UnsafeFileError(ValueError):
    """A file that would run code when unpickled: it refers to Python objects beyond tensors and plain values."""


def load_torch_data(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    allow: Sequence[str] = (),
    what: str = "file",
) -> tuple[Any, list[str]]:
    """Read a ``torch.save``-d file as data; returns (its content, the ``allow``-ed globals it used).

    The pickle's references to Python objects are listed without executing anything (torch's
    zip format only; raw and legacy pickles are refused unread); any beyond what the weights-only
    unpickler accepts (tensors, dicts, lists, tuples, strings, numbers, None) and the fully
    qualified names in ``allow`` raise :class:`UnsafeFileError` naming the file and the objects.
    Anything else unreadable raises ``ValueError``.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a readable torch {what} (not torch's zip format; it was not unpickled)")
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    refused = [name for name in unsafe if name not in allow]
    if refused:
        raise UnsafeFileError(
            f"{path} refers to the Python objects {refused}, which unpickling would import and could run; an rdn "
            f"{what} holds only tensors and plain values, so the file was refused without executing anything. "
            "Only load it by other means if you trust whoever wrote it."
        )
    try:
        # The allowed names the scan found, and their companions it cannot see (e.g. numpy's dtype classes,
        # which a pickled numpy.dtype rebuilds without naming them).
        allowed = [_import_global(name) for name in allow] if unsafe else []
        with torch.serialization.safe_globals([obj for obj in allowed if obj is not None]):
            return torch.load(path, map_location=map_location, weights_only=True), list(unsafe)
    except pickle.UnpicklingError as error:  # a construct the scan let through and the unpickler refused
        raise UnsafeFileError(f"{path} was refused by the weights-only unpickler (nothing ran): {error}") from error
    except Exception as error:
        raise ValueError(f"{path} is not a readable torch {what}: {error}") from error


def _import_global(name: str):
    """The object a fully qualified ``name`` (``module.attribute``) refers to, None where it does not exist
    (e.g. ``numpy.core`` names on another numpy version)."""
    module, _, attribute = name.rpartition(".")
    try:
        with warnings.catch_warnings():  # numpy 2 warns on importing its numpy.core aliases
            warnings.simplefilter("ignore")
            return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError):
        return None


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(temporary path)``, fsync it, then rename it to ``path``; returns ``path``.

    The temporary file lives in ``path``'s folder (a rename is atomic only within one file
    system) and is removed when ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(name))
        with open(name, "rb+") as written:  # the data reaches the disk before the rename makes it visible
            os.fsync(written.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, value) -> Path:
    """``value`` as indented JSON, written atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2)))


# Locks this process holds: folder (resolved) -> [open lock file, hold count].
_held: dict[Path, list] = {}
_held_guard = threading.Lock()


def _lock_file(handle) -> bool:
    """Take an exclusive, non-blocking lock on ``handle``; False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class RunFolder:
    """Exclusive use of ``folder`` by this process, as a context manager.

    On entry: the folder is created (with its parents), checked to be writable, then locked; a
    folder locked by another process raises :class:`RunFolderError` naming the holder (the pid
    and host it wrote into the lock file). :meth:`check_unused` refuses a folder that already
    holds a run's files. On exit the lock is released (by the OS too, if the process dies).

    Example::

        with RunFolder("runs/a") as folder:
            folder.check_unused(["checkpoint.pt", "log.json"], resume=False, overwrite=False)
            ...
    """

    def __init__(self, folder: str | os.PathLike, what: str = "run folder") -> None:
        self.path = Path(folder)
        self.what = what
        self._key: Path | None = None

    def __enter__(self) -> RunFolder:
        self._prepare()
        key = self.path.resolve()
        with _held_guard:
            if key in _held:
                _held[key][1] += 1
                self._key = key
                return self
            lock_path = key / LOCK_NAME
            handle = open(lock_path, "a+")  # noqa: SIM115 (held open for the lock's lifetime)
            if not _lock_file(handle):
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise RunFolderError(
                    f"{self.what} {self.path} is in use by {holder} (lock {lock_path}); two jobs writing one folder "
                    "would destroy each other's work: wait for it to finish, stop it, or use another folder"
                )
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            _held[key] = [handle, 1]
            self._key = key
        return self

    def __exit__(self, *exc_info) -> None:
        if self._key is None:
            return
        with _held_guard:
            entry = _held[self._key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[self._key]
                entry[0].close()  # closing the descriptor releases the flock
        self._key = None

    def _prepare(self) -> None:
        """Create the folder and prove it writable now, before any work starts."""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"{self.what} {self.path} is a file, not a folder; choose another path")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.path):
                pass
        except OSError as error:
            raise RunFolderError(f"{self.what} {self.path} cannot be written: {error.strerror or error}") from error

    def existing(self, names: Iterable[str]) -> list[str]:
        """Which of ``names`` already exist in the folder."""
        return [name for name in names if (self.path / name).exists()]

    def check_unused(self, names: Iterable[str], *, resume: bool, overwrite: bool,
                     describe: Callable[[], str] | None = None) -> None:  # fmt: skip
        """Refuse to start a new run over files of an earlier one.

        Args:
            names: the files this job writes.
            resume: the job continues the run already in the folder (its own checks apply).
            overwrite: the user asked to replace the earlier run: its files are removed now.
            describe: says what the earlier run is (e.g. its epoch), for the message; called only
                when refusing (reading a checkpoint to say so costs a full load).
        """
        found = self.existing(names)
        if not found or resume:
            return
        if overwrite:
            for name in found:
                (self.path / name).unlink()
            return
        described = describe() if describe is not None else ""
        what = f" ({described})" if described else ""
        raise RunFolderError(
            f"{self.what} {self.path} already holds a run{what}: {', '.join(found)}. Starting a new run there would "
            "overwrite it: pass --resume (resume=True) to continue it, --overwrite (overwrite=True) to replace it, "
            "or choose another folder"
        )
