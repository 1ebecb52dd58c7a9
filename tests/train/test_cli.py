"""The ``rdn`` command line, in process on tiny synthetic runs (and once as ``python -m rdn``)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types

import pytest
import torch

from rdn.cli import build_parser, main

TINY = ["--data", "synthetic", "--width-mult", "0.1", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16",
        "--eval-batch-size", "64", "--no-progress"]  # fmt: skip
TRAIN = ["--data", "synthetic", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16", "--no-progress"]


def pretrain(out, *extra) -> int:
    return main(["pretrain", "--model", "mobilenet_v2", *TINY, "--out", str(out), *extra])


def test_pretrain_nest_finetune(tmp_path):
    assert pretrain(tmp_path / "base") == 0
    base = json.loads((tmp_path / "base" / "summary.json").read_text())
    assert base["steps"] == 2 and len(base["exits"]) == 1 and base["final"]["epoch"] == 1

    nest_args = ["nest", "--from", str(tmp_path / "base"), "--k", "2", "--data", "synthetic", "--calib-samples", "16"]
    assert main([*nest_args, "--out", str(tmp_path / "rdn")]) == 0
    nested = json.loads((tmp_path / "rdn" / "summary.json").read_text())
    assert nested["num_subnets"] == 3 and len(nested["rdn_test_top1"]) == 3
    macs = [exit["macs"] for exit in nested["exits"]]
    assert macs == sorted(macs) and len(set(macs)) == 3 and nested["base"]["macs"] > 0

    finetune = ["finetune", "--from", str(tmp_path / "rdn"), *TRAIN, "--exits", "all_but_lightest", "--distill", "0.5"]
    assert main([*finetune, "--out", str(tmp_path / "ft")]) == 0
    tuned = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert tuned["train_config"]["exits"] == "all_but_lightest" and tuned["train_config"]["distill"] == 0.5
    assert [f"test_top1_{s}" in tuned["final"] for s in (1, 2, 3)] == [True] * 3
    assert {"log.csv", "log.json", "accuracy.png", "checkpoint.pt"} <= {p.name for p in (tmp_path / "ft").iterdir()}

    # From scratch (paper Table 3 ablation): nest a randomly initialised base model.
    scratch = ["nest", "--model", "mobilenet_v2", "--width-mult", "0.1", "--k", "2", "--data", "synthetic",
               "--calib-samples", "16", "--no-eval", "--out", str(tmp_path / "scratch")]  # fmt: skip
    assert main(scratch) == 0
    assert "random" in json.loads((tmp_path / "scratch" / "summary.json").read_text())["from"]

    # A MAC budget: N_K's MACs at most 1.2 × the base's; an unreachable one is a clear error.
    budget = [*nest_args, "--no-exact", "--copy-fraction", "0.5", "--mac-budget", "1.2", "--compensate", "--no-eval",
              "--out", str(tmp_path / "budget")]  # fmt: skip
    assert main(budget) == 0
    pruned = json.loads((tmp_path / "budget" / "summary.json").read_text())
    assert not pruned["exact"] and pruned["copy_fraction"] == 0.5 and pruned["compensate"]
    assert pruned["exits"][-1]["macs"] <= 1.2 * pruned["base"]["macs"] < macs[-1]
    assert main([*budget[:-3], "--mac-budget", "0.5", "--out", str(tmp_path / "far")]) == 2

    # Wrong kind of checkpoint for each command.
    assert main(["finetune", "--from", str(tmp_path / "base"), *TRAIN, "--out", str(tmp_path / "x")]) == 2
    assert main([*nest_args[:1], "--from", str(tmp_path / "rdn"), *nest_args[3:], "--out", str(tmp_path / "y")]) == 2


def test_bad_input_gets_a_clear_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--model", "mobilenet_v2", "--data", "imagenet", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "invalid choice: 'imagenet'" in capsys.readouterr().err

    assert pretrain(tmp_path / "a", "--data", "fashion_mnist", "--data-root", str(tmp_path)) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err

    assert pretrain(tmp_path / "b", "--batch-size", "100000") == 2
    assert "batch_size 100000 is larger than" in capsys.readouterr().err

    assert main(["finetune", "--from", str(tmp_path / "nothing"), *TRAIN, "--out", str(tmp_path / "c")]) == 2
    assert "no checkpoint.pt there" in capsys.readouterr().err

    assert main(["nest", "--data", "synthetic", "--out", str(tmp_path / "d")]) == 2
    assert "needs --from" in capsys.readouterr().err


def test_resume_refuses_another_models_checkpoint(tmp_path, capsys):
    assert pretrain(tmp_path) == 0
    capsys.readouterr()
    assert pretrain(tmp_path, "--width-mult", "0.25", "--resume") == 2
    assert "was written for base model" in capsys.readouterr().err


def test_nan_loss_stops_with_exit_status_3(tmp_path, capsys, monkeypatch):
    import rdn.models

    create = rdn.models.create

    def create_poisoned(**kwargs):
        """The real model, whose logits turn NaN from its 4th training forward on."""
        model = create(**kwargs)
        calls = []

        def poison(module, args, output):
            calls.append(module.training)
            return output * float("nan") if calls.count(True) > 3 else output

        model.register_forward_hook(poison)
        return model

    monkeypatch.setattr(rdn.models, "create", create_poisoned)
    assert pretrain(tmp_path, "--steps-per-epoch", "6", "--checkpoint-every", "2") == 3
    message = capsys.readouterr().err
    assert "training loss is nan at epoch 0, step 4" in message and "last good checkpoint" in message
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 2


def test_every_option_is_explained():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("pretrain", "nest", "finetune"):
        for action in commands.choices[name]._actions:
            assert action.help, f"rdn {name} {action.option_strings} has no help"


def test_pipeline_hook_imports_its_module_lazily(monkeypatch):
    calls = []
    fake = types.ModuleType("rdn.pipeline")
    fake.add_arguments = lambda parser: parser.add_argument("--stages", default="all")
    fake.main = lambda args: calls.append(args.stages)
    monkeypatch.setitem(sys.modules, "rdn.pipeline", fake)
    assert main(["pipeline", "--stages", "nest"]) == 0 and calls == ["nest"]


def test_pipeline_without_its_module(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rdn.pipeline", None)  # import of rdn.pipeline fails as if the file were missing
    assert main(["pipeline"]) == 2
    assert "needs the module rdn.pipeline" in capsys.readouterr().err


def test_python_dash_m():
    result = subprocess.run([sys.executable, "-m", "rdn", "finetune", "--help"], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0 and "--exits {all,all_but_lightest,largest}" in result.stdout
