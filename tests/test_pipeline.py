"""``rdn pipeline``: options and presets, the CLI hook, dataset fall-back, resume safety, atomic
outputs; the whole ``--quick`` run (slow) and its resumption."""

import argparse
import json
import time

import pytest
import torch

from rdn import pipeline
from rdn.models import create
from rdn.surgery import nest


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    pipeline.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_presets_and_overrides():
    quick = pipeline._settings(parse("--out", "x", "--quick"))
    assert quick["dataset"] == "mnist5k" and quick["quick"] and quick["k"] == 4
    assert {key: quick[key] for key in pipeline.PRESETS["quick"]} == pipeline.PRESETS["quick"]
    default = pipeline._settings(parse("--out", "x", "--dataset", "fashion-mnist", "--base-epochs", "3", "--k", "3"))
    assert default["dataset"] == "fashion_mnist" and default["base_epochs"] == 3 and default["k"] == 3
    assert default["finetune_epochs"] == pipeline.PRESETS["default"]["finetune_epochs"]
    assert pipeline._settings(parse("--out", "x", "--quick", "--dataset", "mnist-5k"))["dataset"] == "mnist5k"
    assert default["exact"] and default["mac_budget"] is None and default["copy_fraction"] == 1
    assert default["finetune_lr"] is None and pipeline._finetune_lr_summary(default) == ""
    tuned = pipeline._settings(parse("--out", "x", "--finetune-lr", "0.0125"))
    assert tuned["finetune_lr"] == 0.0125 and "learning rate 0.0125" in pipeline._finetune_lr_summary(tuned)
    budget = pipeline._settings(parse("--out", "x", "--no-exact", "--mac-budget", "1.15", "--copy-fraction", "0.5"))
    assert not budget["exact"] and budget["mac_budget"] == 1.15 and budget["copy_fraction"] == 0.5
    assert "copies for 0.5 of each" in pipeline._surgery_summary(budget)
    assert "at most 1.15× the base" in pipeline._surgery_summary(budget)
    with pytest.raises(SystemExit):
        parse("--out", "x", "--dataset", "imagenet")


def test_cli_hands_the_pipeline_command_to_this_module():
    from rdn.cli import build_parser

    args = build_parser(with_pipeline=True).parse_args(["pipeline", "--out", "runs/x", "--quick", "--k", "2"])
    assert args.pipeline_available and args.quick and args.k == 2 and args.out == "runs/x"


def test_missing_fashion_mnist_falls_back_to_mnist5k(monkeypatch, tmp_path, capsys):
    import rdn.data

    monkeypatch.setattr(rdn.data, "FASHION_MNIST_DIR", tmp_path / "absent")
    settings = pipeline._settings(parse("--out", "x"))
    data = pipeline._load_data(settings, None)
    assert settings["dataset"] == "mnist5k" and data.spec.name == "mnist5k"
    assert "falling back to MNIST-5k" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError):  # an explicit root is never replaced silently
        pipeline._load_data(pipeline._settings(parse("--out", "x")), str(tmp_path))


def test_a_run_folder_is_resumed_only_with_the_same_settings(tmp_path):
    settings = pipeline._settings(parse("--out", "x", "--quick"))
    pipeline._check_resumable(tmp_path, settings)
    pipeline._check_resumable(tmp_path, dict(settings, repeats=7))  # timing repeats do not change results
    with pytest.raises(ValueError, match="base_epochs"):
        pipeline._check_resumable(tmp_path, dict(settings, base_epochs=5))
    older = {key: value for key, value in settings.items() if key not in pipeline._SETTINGS_ADDED_LATER}
    (tmp_path / "settings.json").write_text(json.dumps(older))  # written before those settings existed
    pipeline._check_resumable(tmp_path, settings)
    with pytest.raises(ValueError, match="mac_budget"):
        pipeline._check_resumable(tmp_path, dict(settings, mac_budget=1.15))
    with pytest.raises(ValueError, match="finetune_lr"):
        pipeline._check_resumable(tmp_path, dict(settings, finetune_lr=0.01))


@pytest.mark.slow
def test_quick_pipeline_end_to_end_and_resume(tmp_path, capsys, monkeypatch):
    import rdn.train

    # Which peak learning rate each training ran with, by run sub-folder.
    peak_lrs, fit = {}, rdn.train.fit

    def recording_fit(model, splits, config, out, **kwargs):
        peak_lrs[out.name] = config.peak_lr
        return fit(model, splits, config, out=out, **kwargs)

    monkeypatch.setattr(rdn.train, "fit", recording_fit)
    out = tmp_path / "run"
    options = ("--out", str(out), "--quick", "--no-progress", "--finetune-lr", "0.02")
    started = time.perf_counter()
    pipeline.main(parse(*options))
    first = time.perf_counter() - started
    for name in ("settings.json", "base/result.json", "nested.pt", "finetune/result.json", "outputs/test.pt",
                 "order.json", "order.png", "policy.pt", "calibration.json", "evaluation.json", "report.md",
                 "tradeoff.png"):
        assert (out / name).exists(), name
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["engine"]["minus_outputs"]["top1_points"] == pytest.approx(0, abs=0.5)
    assert len(evaluation["static"]) == 7 and len(evaluation["dynamic"]) == len(evaluation["confidence"])
    report = (out / "report.md").read_text()
    assert "| RDN N_K |" in report and "RDN† (dynamic" in report and "## Targets" in report
    capsys.readouterr()

    started = time.perf_counter()
    pipeline.main(parse(*options))
    again = time.perf_counter() - started
    log = capsys.readouterr().out
    assert log.count("done, skipped") == 7  # every step but the report
    assert again < first

    # --ablations on the finished run: only the ablations and the report run.
    pipeline.main(parse(*options, "--ablations"))
    log = capsys.readouterr().out
    assert log.count("done, skipped") == 7 and "[8/9] ablations" in log
    report = (out / "report.md").read_text()
    for name in pipeline.ABLATIONS:
        result = json.loads((out / "ablations" / name / "test.json").read_text())
        assert len(result["top1"]) == 7 and all(0.0 <= top1 <= 1.0 for top1 in result["top1"])
        assert result["macs"] == pytest.approx([point["macs"] for point in evaluation["static"]])
        assert f"| {name}: " in report
    # Pretraining and training from scratch keep the default rate (0.1 x 64 / 256); fine-tuning uses --finetune-lr.
    assert peak_lrs == {"base": 0.025, "finetune": 0.02, "random_select": 0.02, "from_scratch": 0.025,
                        "all_but_lightest": 0.02, "largest_only": 0.02}  # fmt: skip
    assert "at peak learning rate 0.02" in report


@pytest.mark.parametrize("depth_split", [None, 6])
def test_exit_grid_and_nesting_order_cells(depth_split):
    """Exits map to the order's (width, depth) grid and back; with a depth split the grid has two
    columns (shallow, full depth) and the chosen path's exits grow in the engine's exit order."""
    from rdn.order import nesting_order

    torch.manual_seed(0)
    model = create("mobilenet_v2", num_classes=10, input_size=28, in_chans=1, width_mult=0.25)
    net = nest(model, k=2, calib=torch.randn(4, 1, 28, 28), depth_split=depth_split).eval()
    exits = list(range(1, net.num_subnets + 1))
    grid = pipeline._exit_grid(net, [float(e) for e in exits])
    assert (len(grid), len(grid[0])) == (net.num_groups, 1 if depth_split is None else 2)
    cells = [(w, d) for w in range(len(grid)) for d in range(len(grid[0]))]
    assert sorted(pipeline._cell_exit(net, cell) for cell in cells) == exits
    assert all(grid[w][d] == pipeline._cell_exit(net, (w, d)) for w, d in cells)
    macs = pipeline._exit_grid(net, [float(net.macs(e)) for e in exits])
    order = nesting_order(macs, grid)  # accuracy = exit number: every cell is worth visiting
    path_exits = [pipeline._cell_exit(net, cell) for cell in order.path]
    assert path_exits == sorted(path_exits) and path_exits[-1] == net.num_subnets
