"""Nothing executed, nothing lost: every public path that loads a checkpoint refuses a trapped one
without running it; run folders are checked, refused and locked before any work starts."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

import rdn.cli
from rdn.cli import main
from rdn.experiments import pipeline
from rdn.experiments.config import from_arguments
from rdn.files import RunFolder, RunFolderError
from rdn.train import TrainConfig, fit, load_checkpoint, load_model, save_checkpoint
from rdn.train.checkpoint import FORMAT, UnsafeCheckpointError, get_rng_state, set_rng_state
from tests.folder_holder import hold_in_another_process
from tests.train.helpers import synthetic, tiny_rdn

TRAIN = ["--data", "synthetic", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16",
         "--eval-batch-size", "64", "--no-progress"]  # fmt: skip
PRETRAIN = ["pretrain", "--model", "mobilenet_v2", "--width-mult", "0.1", *TRAIN]


class Trap:
    """Unpickling this object runs a shell command that creates ``marker``."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture
def trapped(tmp_path):
    """A run folder whose checkpoint.pt looks like an rdn checkpoint and carries a trap; returns (folder, marker)."""
    folder, marker = tmp_path / "trapped", tmp_path / "code-ran"
    folder.mkdir()
    model_config = {"kind": "base", "create": {"name": "mobilenet_v2", "num_classes": 10, "input_size": 16,
                                               "in_chans": 1, "width_mult": 0.1}}  # fmt: skip
    torch.save({"format": FORMAT, "version": 2, "model_config": model_config, "model": {}, "ema": None,
                "step": 0, "epoch": 0, "extra": Trap(marker)}, folder / "checkpoint.pt")  # fmt: skip
    yield folder, marker
    assert not marker.exists(), "loading the trapped checkpoint ran its code"


def test_the_trap_is_real(trapped):
    folder, marker = trapped
    torch.load(folder / "checkpoint.pt", weights_only=False)  # what the loader did before: runs the command
    assert marker.exists()
    marker.unlink()


def test_library_loaders_refuse_a_trapped_checkpoint(trapped):
    folder, _ = trapped
    path = folder / "checkpoint.pt"
    message = rf"{path} refers to the Python objects \['posix.system'\].*refused without executing anything"
    for load in (load_checkpoint, load_model):
        with pytest.raises(UnsafeCheckpointError, match=message):
            load(path)
    with pytest.raises(UnsafeCheckpointError, match=message):
        fit(tiny_rdn(), synthetic(), TrainConfig(epochs=1, batch_size=16, progress=False), out=folder, resume=True)


@pytest.mark.parametrize("command", ["nest", "finetune", "resume"])
def test_cli_refuses_a_trapped_checkpoint(trapped, tmp_path, capsys, command):
    folder, _ = trapped
    argv = {
        "nest": ["nest", "--from", str(folder), "--data", "synthetic", "--out", str(tmp_path / "out")],
        "finetune": ["finetune", "--from", str(folder), *TRAIN, "--out", str(tmp_path / "out")],
        "resume": [*PRETRAIN, "--resume", "--out", str(folder)],
    }[command]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert f"{folder / 'checkpoint.pt'} refers to the Python objects ['posix.system']" in error


def test_pipeline_refuses_a_trapped_checkpoint(trapped, tmp_path):
    folder, _ = trapped
    out = tmp_path / "pipeline"
    args = pipeline_args(out)
    (out / "base").mkdir(parents=True)
    (out / "settings.json").write_text(from_arguments(args).to_json())
    (out / "base" / "result.json").write_text("{}")  # the pretraining step is done: its checkpoint is loaded
    (out / "base" / "checkpoint.pt").write_bytes((folder / "checkpoint.pt").read_bytes())
    with pytest.raises(UnsafeCheckpointError, match=r"base/checkpoint.pt refers to the Python objects"):
        pipeline.main(args)


def pipeline_args(out):
    return rdn.cli.build_parser(with_pipeline=True).parse_args(
        ["pipeline", "--quick", "--no-progress", "--out", str(out)]
    )


def test_checkpoints_hold_only_data_and_version_1_files_still_load(tmp_path):
    with pytest.raises(TypeError, match=r"holds objects that are not tensors or plain values \(numpy"):
        save_checkpoint(tmp_path / "checkpoint.pt", {"x": np.zeros(2)})
    assert not any(tmp_path.iterdir())

    # Version 1 pickled numpy's RNG state as an array; such files are read (numpy's array rebuild only).
    np.random.seed(5)
    random.seed(6)
    torch.manual_seed(7)
    legacy = {"format": FORMAT, "version": 1, "step": 3,
              "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}
    torch.save(legacy, tmp_path / "v1.pt")
    expected = (np.random.rand(), random.random(), torch.rand(1))
    state = load_checkpoint(tmp_path / "v1.pt")
    set_rng_state(state["rng"])
    assert (np.random.rand(), random.random(), torch.rand(1)) == expected

    # Version 2 stores the same generators as tensors and lists, and restores them exactly.
    save_checkpoint(tmp_path / "v2.pt", {"rng": get_rng_state()})
    expected = (np.random.rand(), np.random.randn(), random.random(), torch.rand(1))
    set_rng_state(load_checkpoint(tmp_path / "v2.pt")["rng"])
    assert (np.random.rand(), np.random.randn(), random.random(), torch.rand(1)) == expected


# ----------------------------------------------------------------------------------------------
# Run folders
# ----------------------------------------------------------------------------------------------


def test_rerunning_into_a_finished_run_is_refused_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*PRETRAIN, "--out", str(out)]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    log_before = (out / "log.json").read_text()

    assert main([*PRETRAIN, "--lr", "0.01", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"run folder {out} already holds a run (epoch 1 of 1, step 2)" in error
    assert "checkpoint.pt" in error and "--resume" in error and "--overwrite" in error
    assert (out / "checkpoint.pt").read_bytes() == before and (out / "log.json").read_text() == log_before

    nest = ["nest", "--from", str(out), "--k", "2", "--data", "synthetic", "--calib-samples", "16", "--no-eval"]
    assert main([*nest, "--out", str(out)]) == 2  # nest into its own source: refused, not overwritten
    assert (out / "checkpoint.pt").read_bytes() == before

    assert main([*PRETRAIN, "--resume", "--overwrite", "--out", str(out)]) == 2
    assert "give one of them" in capsys.readouterr().err

    assert main([*PRETRAIN, "--lr", "0.01", "--overwrite", "--out", str(out)]) == 0
    rows = json.loads((out / "log.json").read_text())["epochs"]
    assert len(rows) == 1 and load_checkpoint(out)["train_config"]["lr"] == 0.01  # the new run only


def test_fit_refuses_a_folder_holding_a_run(tmp_path):
    config = TrainConfig(epochs=1, batch_size=16, steps_per_epoch=2, progress=False, eval_batch_size=64)
    fit(tiny_rdn(), synthetic(), config, out=tmp_path)
    with pytest.raises(RunFolderError, match=rf"{tmp_path} already holds a run \(epoch 1 of 1, step 2\)"):
        fit(tiny_rdn(), synthetic(), config, out=tmp_path)
    with pytest.raises(ValueError, match="contradict"):
        fit(tiny_rdn(), synthetic(), config, out=tmp_path, resume=True, overwrite=True)
    result = fit(tiny_rdn(seed=1), synthetic(), config, out=tmp_path, overwrite=True)
    assert result.steps == 2 and load_checkpoint(tmp_path)["step"] == 2


def test_a_second_writer_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(rdn.cli, "_load_data", lambda args: calls.append(args))  # any work would show here
    busy = tmp_path / "busy"
    holder = hold_in_another_process(busy)
    try:
        assert main([*PRETRAIN, "--out", str(busy)]) == 2
        assert f"run folder {busy} is in use by pid {holder.pid}" in capsys.readouterr().err
        with pytest.raises(RunFolderError, match="in use by"):
            fit(tiny_rdn(), synthetic(), TrainConfig(epochs=1, batch_size=16, progress=False), out=busy)
        with pytest.raises(RunFolderError, match="in use by"):
            pipeline.main(pipeline_args(busy))
    finally:
        holder.kill()
        holder.wait()
    assert calls == []


@pytest.mark.parametrize("where", ["file", "under a file", "read-only"])
def test_an_unwritable_out_is_refused_before_any_work(tmp_path, capsys, monkeypatch, where):
    calls = []
    monkeypatch.setattr(rdn.cli, "_load_data", lambda args: calls.append(args))
    (tmp_path / "file").write_text("x")
    out = {"file": tmp_path / "file", "under a file": tmp_path / "file" / "run", "read-only": "/proc/rdn-run"}[where]
    assert main([*PRETRAIN, "--out", str(out)]) == 2
    assert f"run folder {out}" in capsys.readouterr().err
    assert calls == []


def test_pipeline_refuses_a_folder_of_something_else(tmp_path):
    with RunFolder(tmp_path / "run") as folder:
        (folder.path / "checkpoint.pt").write_text("a pretrain run")
    with pytest.raises(RunFolderError, match=r"holds files of something else \(checkpoint.pt\)"):
        pipeline.main(pipeline_args(tmp_path / "run"))
