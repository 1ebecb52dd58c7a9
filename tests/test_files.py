"""rdn.files: atomic writes, torch files read as data only, run folders checked and locked."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from rdn.files import RunFolder, RunFolderError, UnsafeFileError, atomic_write, load_torch_data, write_json
from tests.folder_holder import hold_in_another_process, try_in_another_process


class Trap:
    """Unpickling this object creates ``marker``: proof that loading a file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def trapped_files(folder: Path) -> list[tuple[Path, Path]]:
    """(file, marker) pairs: one trapped object in torch's zip format, the legacy format and a raw pickle."""
    files = []
    for name in ("zip", "legacy", "raw"):
        marker, path = folder / f"{name}.ran", folder / f"{name}.pt"
        content = {"weights": torch.ones(2), "trap": Trap(marker)}
        if name == "raw":
            path.write_bytes(pickle.dumps(content))
        else:
            torch.save(content, path, _use_new_zipfile_serialization=name == "zip")
        files.append((path, marker))
    return files


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "sub" / "value.json"
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}

    def fail(path):
        path.write_text("partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "other.json", fail)
    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # no partial file, no temporary left
    assert json.loads(target.read_text()) == {"a": 1}  # the previous version is intact


def test_torch_files_are_read_as_data_and_trapped_ones_refused_unexecuted(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"weights": torch.arange(3), "meta": [1, "a", None, (2.5,)]}, good)
    content, used = load_torch_data(good)
    assert torch.equal(content["weights"], torch.arange(3)) and content["meta"] == [1, "a", None, (2.5,)]
    assert used == []

    zip_trap, legacy_trap, raw_trap = trapped_files(tmp_path)
    refused = rf"{zip_trap[0]} refers to the Python objects \[.posix.system.\].*refused"
    with pytest.raises(UnsafeFileError, match=refused):
        load_torch_data(zip_trap[0], what="policy file")
    for path, _ in (legacy_trap, raw_trap):
        with pytest.raises(ValueError, match=rf"{path} is not a readable torch file .*not unpickled"):
            load_torch_data(path)
    assert not any(marker.exists() for _, marker in (zip_trap, legacy_trap, raw_trap))
    # Allowing a global by name is the only way in (checkpoint version 1 allows numpy's array rebuild).
    with pytest.raises(UnsafeFileError):
        load_torch_data(zip_trap[0], allow=("numpy.ndarray",))


def test_run_folder_refuses_what_cannot_be_written_before_any_work(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(RunFolderError, match=rf"run folder {a_file} is a file, not a folder"):
        RunFolder(a_file).__enter__()
    with pytest.raises(RunFolderError, match=rf"run folder {a_file / 'sub'} cannot be written"):
        RunFolder(a_file / "sub").__enter__()
    if Path("/proc/self").is_dir():  # a read-only place, even for root
        with pytest.raises(RunFolderError, match="cannot be written"):
            RunFolder("/proc/rdn-run").__enter__()
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "read-only"
        locked.mkdir(mode=0o500)
        with pytest.raises(RunFolderError, match="cannot be written"):
            RunFolder(locked).__enter__()


def test_run_folder_refuses_an_earlier_run_unless_resumed_or_overwritten(tmp_path):
    with RunFolder(tmp_path / "run") as folder:
        folder.check_unused(["checkpoint.pt", "log.json"], resume=False, overwrite=False)  # fresh: fine
        (folder.path / "checkpoint.pt").write_text("earlier")
        (folder.path / "notes.txt").write_text("the user's")
        with pytest.raises(RunFolderError, match=r"run folder .*run already holds a run \(epoch 3\): checkpoint.pt.*"
                                                 r"--resume .*--overwrite"):  # fmt: skip
            folder.check_unused(["checkpoint.pt", "log.json"], resume=False, overwrite=False,
                                describe=lambda: "epoch 3")
        assert (folder.path / "checkpoint.pt").read_text() == "earlier"
        folder.check_unused(["checkpoint.pt", "log.json"], resume=True, overwrite=False)
        assert (folder.path / "checkpoint.pt").exists()
        folder.check_unused(["checkpoint.pt", "log.json"], resume=False, overwrite=True)
        assert sorted(p.name for p in folder.path.iterdir()) == [".lock", "notes.txt"]  # only the run's files go


def test_a_second_writer_gets_a_clear_error_and_a_dead_holder_leaves_no_stale_lock(tmp_path):
    folder = tmp_path / "run"
    holder = hold_in_another_process(folder)
    try:
        with pytest.raises(RunFolderError, match=rf"run folder {folder} is in use by pid {holder.pid} on "):
            RunFolder(folder).__enter__()
    finally:
        holder.kill()
        holder.wait()
    with RunFolder(folder):  # the OS released the killed holder's lock
        with RunFolder(folder):  # re-entrant within one process (the CLI, then fit)
            pass
        other = try_in_another_process(folder)  # still held by this process after the inner exit
        assert other.returncode != 0 and f"is in use by pid {os.getpid()}" in other.stderr
    assert try_in_another_process(folder).returncode == 0  # released on exit
