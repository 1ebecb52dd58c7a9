"""The ``rdn`` command line, in process on tiny synthetic runs (and once as ``python -m rdn``)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

from rdn.cli import build_parser, main
from rdn.train import TrainConfig

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
    assert main([*nest_args, "--exact", "--out", str(tmp_path / "rdn")]) == 0  # N_K is the base model
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
    assert not pruned["exact"] and pruned["copy_fraction"] == 0.5 and pruned["compensate"] and pruned["k"] == 2
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
    assert pretrain(tmp_path, "--lr", "0.5", "--resume") == 2  # fit refuses before its first step: a user error
    assert "with different training settings (lr: " in capsys.readouterr().err


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


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def options(command: str) -> dict[str, argparse.Action]:
    return {action.dest: action for action in subcommands()[command]._actions if action.help != argparse.SUPPRESS}


def test_every_option_is_explained_and_no_help_says_default_none():
    for name, parser in subcommands().items():
        for action in parser._actions:
            assert action.help, f"rdn {name} {action.option_strings} has no help"
        text = parser.format_help()
        assert "(default: None)" not in text, name


@pytest.mark.parametrize("command, config, excluded", [
    ("pretrain", "TrainConfig", {"seed", "exits", "exit_weights", "distill", "distill_temperature"}),
    ("finetune", "TrainConfig", {"seed"}),
    ("nest", "NestConfig", {"seed", "skip"}),
    ("pipeline", "NestConfig", {"seed", "skip"}),
    ("pipeline", "ExperimentConfig", {"seed", "preset", "data", "nest"}),
    ("pipeline", "DataConfig", set()),
    ("pretrain", "DataConfig", set()),
])  # fmt: skip
def test_options_are_generated_from_the_configs(command, config, excluded):
    """Every field of the config is an option of the command, with the config's help and its real default."""
    import dataclasses

    from rdn.experiments.config import PRESETS, ExperimentConfig
    from rdn.steps import DataConfig
    from rdn.surgery import NestConfig
    from rdn.train import TrainConfig

    cls = {"TrainConfig": TrainConfig, "NestConfig": NestConfig, "ExperimentConfig": ExperimentConfig,
           "DataConfig": DataConfig}[config]  # fmt: skip
    # The pipeline's defaults are the default preset's; the other commands' the configs' own.
    defaults = {"ExperimentConfig": PRESETS["default"], "NestConfig": NestConfig(), "DataConfig": DataConfig(),
                "TrainConfig": TrainConfig()}[config]  # fmt: skip
    if command == "pipeline" and config != "ExperimentConfig":
        defaults = getattr(PRESETS["default"], {"NestConfig": "nest", "DataConfig": "data"}[config])
    found = options(command)
    for field in dataclasses.fields(cls):
        if field.name in excluded:
            assert field.name not in found or field.name == "seed", field.name
            continue
        action = found[field.name]
        assert field.metadata["help"] in action.help
        value = getattr(defaults, field.name)
        shown = "not set" if value is None else (list(value) if isinstance(value, tuple) else value)
        assert f"(default: {shown}" in action.help, (field.name, action.help)
    assert "--data" in found["dataset"].option_strings


def test_pipeline_help_names_the_quick_presets_values():
    found = options("pipeline")
    assert found["base_epochs"].help.endswith("(default: 2; --quick: 1)")
    assert found["dataset"].help.endswith("(default: fashion_mnist; --quick: mnist5k)")
    assert found["policy_hidden"].help.endswith("(default: 16)")  # the same in both presets


def test_quick_gives_defaults_and_given_options_win():
    from rdn.cli import _data_config, _train_config

    parser = build_parser()
    args = parser.parse_args(["pretrain", "--model", "mobilenet_v2", "--out", "x", "--quick"])
    config = _train_config(args)
    assert (config.epochs, config.steps_per_epoch, _data_config(args).dataset) == (1, 10, "mnist5k")
    args = parser.parse_args(["pretrain", "--model", "mobilenet_v2", "--out", "x", "--quick", "--epochs", "2",
                              "--data", "synthetic", "--ema-decay", "0", "--seed", "4"])  # fmt: skip
    config = _train_config(args)
    assert (config.epochs, config.steps_per_epoch, _data_config(args).dataset) == (2, 10, "synthetic")
    assert config.ema_decay is None and config.seed == 4
    config = _train_config(parser.parse_args(["finetune", "--from", "r", "--out", "x", "--no-nesterov"]))
    assert config == TrainConfig(nesterov=False)


def test_deprecated_option_names_still_work(capsys):
    parser = build_parser()
    args = parser.parse_args(["pipeline", "--dataset", "fashion-mnist"])
    assert args.dataset == "fashion_mnist" and "--dataset is deprecated, use --data" in capsys.readouterr().err
    assert parser.parse_args(["pipeline", "--dataset", "mnist-5k"]).dataset == "mnist5k"
    args = parser.parse_args(["pretrain", "--model", "mobilenet_v2", "--out", "x", "--workers", "2"])
    assert args.num_workers == 2 and "--workers is deprecated, use --num-workers" in capsys.readouterr().err
    assert not hasattr(parser.parse_args(["pretrain", "--model", "mobilenet_v2", "--out", "x"]), "num_workers")
    with pytest.raises(SystemExit):
        parser.parse_args(["pipeline", "--dataset", "imagenet"])


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """A ValueError that is not a refusal of the user's input is not turned into exit status 2."""
    import rdn.steps

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(rdn.steps, "exit_costs", broken)  # runs after training, in the shared step
    with pytest.raises(ValueError, match="an internal bug"):
        pretrain(tmp_path / "run")


def test_fit_refusals_before_training_are_user_errors_after_it_bugs(tmp_path, monkeypatch, capsys):
    import rdn.models

    assert pretrain(tmp_path / "big", "--batch-size", "100000") == 2  # refused before the first step
    assert "batch_size 100000 is larger than" in capsys.readouterr().err

    create = rdn.models.create

    def create_broken(**kwargs):
        """The real model, whose forward raises a ValueError in eval mode: at the epoch's end, after the steps."""
        model = create(**kwargs)

        def fail_in_eval(module, args, output):
            if not module.training:
                raise ValueError("evaluation bug")

        model.register_forward_hook(fail_in_eval)
        return model

    monkeypatch.setattr(rdn.models, "create", create_broken)
    with pytest.raises(ValueError, match="evaluation bug"):
        pretrain(tmp_path / "run")


def test_user_error_traceback_on_request(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RDN_TRACEBACK", "1")
    assert main(["finetune", "--from", str(tmp_path / "nothing"), *TRAIN, "--out", str(tmp_path / "c")]) == 2
    error = capsys.readouterr().err
    assert "Traceback" in error and "rdn.errors.CliError: " in error and "rdn finetune: error: " in error


def test_python_dash_m():
    result = subprocess.run([sys.executable, "-m", "rdn", "finetune", "--help"], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0 and "--exits {all,all_but_lightest,largest}" in result.stdout
