"""``rdn pipeline`` (rdn.experiments): the config and its presets, options, migration of old
settings, resume safety, the step runner, the report's comparisons; the whole ``--quick`` run
(slow), its resumption, ``rdn infer`` on it."""

import argparse
import json
import re
import time
from pathlib import Path

import pytest
import torch

from rdn.cli import build_parser, main
from rdn.config import ConfigError
from rdn.errors import DataError, RunMismatchError
from rdn.experiments import pipeline
from rdn.experiments.config import ABLATIONS, PRESETS, ExperimentConfig, from_arguments
from rdn.experiments.report import comparisons, surgery_summary
from rdn.experiments.runner import Step, run_steps
from rdn.models import create
from rdn.steps import DataConfig
from rdn.surgery import NestConfig, nest


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["pipeline", *argv])


def config_of(*argv: str) -> ExperimentConfig:
    return from_arguments(parse(*argv))


def test_presets_and_overrides():
    assert config_of("--quick") == PRESETS["quick"] and config_of() == PRESETS["default"]
    quick = PRESETS["quick"]
    assert quick.data.dataset == "mnist5k" and quick.preset == "quick" and quick.nest.k == 4
    default = config_of("--data", "fashion_mnist", "--base-epochs", "3", "--k", "3", "--seed", "5")
    assert default.data.dataset == "fashion_mnist" and default.base_epochs == 3 and default.nest.k == 3
    assert default.finetune_epochs == PRESETS["default"].finetune_epochs
    assert default.seed == 5 and default.nest.seed == 5  # one seed for the run, the surgery's included
    assert default.nest.exact and default.nest.mac_budget is None and default.nest.copy_fraction is None
    searched = config_of("--no-exact", "--mac-budget", "1.2")  # the choices stay open for the budget's search
    assert searched.nest.copy_fraction is None and searched.nest.compensate is None
    tuned = config_of("--quick", "--finetune-lr", "0.0125", "--epsilons", "0.1", "0.2")
    assert tuned.finetune_lr == 0.0125 and tuned.epsilons == (0.1, 0.2) and tuned.batch_size == quick.batch_size
    budget = config_of("--no-exact", "--mac-budget", "1.15", "--copy-fraction", "0.5")
    assert not budget.nest.exact and budget.nest.mac_budget == 1.15 and budget.nest.copy_fraction == 0.5
    assert "copies for 0.5 of each" in surgery_summary(budget.nest)
    assert "at most 1.15× the base" in surgery_summary(budget.nest)
    # the exact preset has no search: its summary says so, not "chosen by the budget's search"
    assert surgery_summary(default.nest) == "expand, greedy select, exact"
    assert "chosen by the budget's search" in surgery_summary(searched.nest)
    with pytest.raises(SystemExit):
        parse("--data", "imagenet")
    with pytest.raises(ConfigError, match="epsilons must be target errors in"):
        config_of("--epsilons", "1.5")
    with pytest.raises(ConfigError, match="copy_fraction < 1"):
        config_of("--copy-fraction", "0.5")  # exact surgery copies every channel


def test_the_config_round_trips_through_json():
    config = PRESETS["quick"].replace(epsilons=(0.1,), nest=NestConfig(k=3, exact=False, copy_fraction=0.5))
    assert ExperimentConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["version"] == ExperimentConfig.VERSION


def test_default_run_folder():
    assert str(pipeline.default_folder(PRESETS["default"])) == "runs/mobilenet_v2-fashion_mnist-k4-seed0"
    assert str(pipeline.default_folder(config_of("--quick", "--k", "2", "--seed", "3"))) == \
        "runs/mobilenet_v2-mnist5k-k2-seed3-quick"  # fmt: skip
    assert parse().out is None


def test_without_out_the_run_goes_to_its_default_folder(tmp_path, monkeypatch, capsys):
    """``rdn pipeline`` without --out: the folder under runs/ is named, printed, checked and used."""
    def no_steps(folder, steps):  # what the run would leave for the summary it prints at the end
        assert [step.title for step in steps][-1] == "report"
        (folder / "evaluation.json").write_text(json.dumps(EVALUATION))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "run_steps", no_steps)
    assert main(["pipeline", "--quick", "--data", "synthetic", "--k", "2"]) == 0
    folder = tmp_path / "runs" / "mobilenet_v2-synthetic-k2-seed0-quick"
    assert f"run folder: {folder.relative_to(tmp_path)} (--out chooses another)" in capsys.readouterr().out
    saved = ExperimentConfig.from_json((folder / "settings.json").read_text())
    assert saved == PRESETS["quick"].replace(data=DataConfig(dataset="synthetic"), nest=NestConfig(k=2, exact=True))


def test_missing_fashion_mnist_falls_back_to_mnist5k(monkeypatch, tmp_path, capsys):
    import rdn.data

    monkeypatch.setattr(rdn.data, "FASHION_MNIST_DIR", tmp_path / "absent")
    data, config = pipeline._load_data(PRESETS["default"], None)
    assert config.data.dataset == "mnist5k" and data.spec.name == "mnist5k"
    assert config.replace(data=DataConfig()) == PRESETS["default"]  # nothing else changed
    assert "falling back to MNIST-5k" in capsys.readouterr().out
    with pytest.raises(DataError):  # an explicit root is never replaced silently
        pipeline._load_data(PRESETS["default"], str(tmp_path))


# The settings.json a quick run wrote before ExperimentConfig (a plain dict, no version), minus the
# keys that older folders still did not have.
UNVERSIONED_QUICK = {
    "dataset": "mnist5k", "width_mult": 0.25, "base_epochs": 1, "finetune_epochs": 1, "steps_per_epoch": 8,
    "batch_size": 64, "bn_momentum": 0.1, "monitor_samples": 256, "policy_samples": 500, "policy_epochs": 20,
    "policy_hidden": 16, "calib_samples": 64, "bench_batch": 256, "repeats": 1, "time_every_subnet": False,
    "model": "mobilenet_v2", "k": 4, "seed": 0, "epsilons": None, "quick": True, "all_exits": False,
    "ablations": False, "depth_split": None, "bench_device": None, "bench_threads": None,
}  # fmt: skip


def test_unversioned_settings_are_migrated():
    config = ExperimentConfig.from_dict(UNVERSIONED_QUICK)
    assert config.preset == "quick" and config.data == DataConfig(dataset="mnist5k", calib_rule="tenth")
    assert config.nest == NestConfig(k=4, mode="expand", select="greedy", exact=True, copy_fraction=1.0,
                                     compensate=False, seed=0)  # fmt: skip
    assert (config.steps_per_epoch, config.batch_size, config.finetune_lr, config.lr) == (8, 64, None, None)
    assert config.warmup_epochs == 1.0  # what the old pipeline's training ran with
    assert config.policy_members == 1  # its policy was one MLP


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.mark.parametrize("path", sorted(RESULTS.glob("**/settings.json")), ids=lambda p: str(p.relative_to(RESULTS)))
def test_the_repositorys_recorded_runs_still_read(path):
    """settings.json files committed under benchmarks/results read; those the old pipeline wrote migrate."""
    saved = json.loads(path.read_text())
    config = ExperimentConfig.from_dict(saved)
    if saved.get("version", 1) < 3:  # written before the policy was an ensemble
        assert config.policy_members == 1
    if "version" not in saved:
        assert config.data.dataset == saved["dataset"] and config.nest.k == saved["k"]
        assert config.nest.mode == "expand" and config.nest.exact == saved.get("exact", True)
    assert ExperimentConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*/evaluation.json")), ids=lambda p: p.parent.name)
def test_comparisons_of_the_repositorys_recorded_runs(path):
    """The report's comparisons render from the evaluation.json files committed under benchmarks/results:
    those of the old pipeline (an ε operating point) and those with a risk-controlled one (δ)."""
    evaluation = json.loads(path.read_text())
    lines = comparisons(evaluation)
    if "risk_control" not in evaluation:
        assert len(lines) == 4 and f"ε = {evaluation['engine']['epsilon']:.4f}" in lines[0]
    else:
        delta = evaluation["risk_control"]["policy"]["delta"]
        assert f"δ = {delta:g} tolerated disagreement" in lines[0] and any("Guaranteed" in line for line in lines)


def test_a_run_folder_is_resumed_only_with_the_same_settings(tmp_path):
    config = PRESETS["quick"]
    pipeline.check_resumable(tmp_path, config)
    assert ExperimentConfig.from_json((tmp_path / "settings.json").read_text()) == config
    pipeline.check_resumable(tmp_path, config.replace(repeats=7, ablations=True))  # timing, optional step
    with pytest.raises(RunMismatchError, match=r"base_epochs: 1 -> 5"):
        pipeline.check_resumable(tmp_path, config.replace(base_epochs=5))
    with pytest.raises(RunMismatchError, match=r"nest\.k: 4 -> 3"):
        pipeline.check_resumable(tmp_path, config.replace(nest=config.nest.replace(k=3)))

    (tmp_path / "settings.json").write_text(json.dumps(UNVERSIONED_QUICK))  # written by the old pipeline
    old = ExperimentConfig.from_dict(UNVERSIONED_QUICK)
    pipeline.check_resumable(tmp_path, old)  # resumes, and the file is now this config's JSON
    assert json.loads((tmp_path / "settings.json").read_text())["kind"] == "ExperimentConfig"
    with pytest.raises(RunMismatchError, match=r"nest\.mac_budget: None -> 1\.15"):
        pipeline.check_resumable(tmp_path, old.replace(nest=old.nest.replace(exact=False, mac_budget=1.15)))
    with pytest.raises(RunMismatchError, match="finetune_lr"):
        pipeline.check_resumable(tmp_path, old.replace(finetune_lr=0.01))


def test_runner_skips_steps_whose_outputs_exist(tmp_path, capsys):
    calls = []

    def write(name):
        def run():
            calls.append(name)
            (tmp_path / name).write_text(name)

        return run

    steps = [Step("first", ("a.txt",), write("a.txt")), Step("second", ("b.txt", "c.txt"), write("b.txt")),
             Step("always", (), lambda: calls.append("always"))]  # fmt: skip
    assert run_steps(tmp_path, steps) == ["first", "second", "always"]
    (tmp_path / "c.txt").write_text("")
    assert run_steps(tmp_path, steps) == ["always"]  # both outputs of "second" exist now
    (tmp_path / "b.txt").unlink()
    assert run_steps(tmp_path, steps) == ["second", "always"]
    assert calls == ["a.txt", "b.txt", "always", "always", "b.txt", "always"]
    assert "[1/3] first: done, skipped (a.txt exist)" in capsys.readouterr().out


def point(name, accuracy, macs, epsilon=None, parameter=None, saving=0.0):
    return {"name": name, "accuracy": accuracy, "macs": macs, "epsilon": epsilon, "parameter": parameter,
            "saving": saving, "top5": 1.0, "exit_fractions": [1.0]}  # fmt: skip


EVALUATION = {
    "static": [point("N_1", 0.70, 1e6), point("N_2", 0.80, 4e6)],
    "base": point("base", 0.81, 2e6),
    "engine": point("dynamic", 0.79, 2e6, 0.2, 0.5, saving=0.5),
    "dynamic": [point("dynamic", 0.79, 2e6, 0.2, 0.5), point("dynamic", 0.80, 4e6, 0.1, None)],
    "confidence": [point("confidence", 0.79, 3e6, 0.2, 0.9), point("confidence", 0.75, 1.5e6, 0.3, 0.8)],
    "measurements": [{"name": "N_2 static", "batch_size": 8, "images_per_second": 100.0},
                     {"name": "dynamic ε=0.2000", "batch_size": 8, "images_per_second": 150.0}],
}  # fmt: skip


def test_comparisons_state_results_not_targets():
    text = "\n".join(comparisons(EVALUATION))
    assert "top-1 79.00 % vs 80.00 % (-1.00 points), 2.00 vs 4.00 MMACs per image (50.0 % fewer)" in text
    assert "static N_K -1.00 points at 2.00× its MACs; dynamic inference -2.00 points at 1.00× its MACs" in text
    assert "150.0 images/s, static N_K 100.0 images/s (1.50×)" in text
    # The fallback point (parameter None) is not compared; 79 %: 2.00 vs the 79 % confidence point's 3.00.
    assert "79.00 %: 2.00 vs 3.00. Dynamic inference needs fewer MACs at 1 of these 1 accuracies." in text
    assert not re.search(r"\bmet\b|target", text)


@pytest.mark.slow
def test_quick_pipeline_end_to_end_and_resume(tmp_path, capfd, monkeypatch):
    import rdn.train

    # Which peak learning rate each training ran with, by run sub-folder.
    peak_lrs, fit = {}, rdn.train.fit

    def recording_fit(model, splits, config, out, **kwargs):
        peak_lrs[out.name] = config.peak_lr
        return fit(model, splits, config, out=out, **kwargs)

    monkeypatch.setattr(rdn.train, "fit", recording_fit)
    out = tmp_path / "run"
    options = ("pipeline", "--out", str(out), "--quick", "--no-progress", "--finetune-lr", "0.02")
    started = time.perf_counter()
    assert main(list(options)) == 0
    first = time.perf_counter() - started
    log = capfd.readouterr()
    for name in ("settings.json", "base/result.json", "nested.pt", "finetune/result.json", "outputs/test.pt",
                 "order.json", "order.png", "policy.pt", "calibration.json", "evaluation.json", "report.md",
                 "tradeoff.png", "finetune/summary.json"):
        assert (out / name).exists(), name
    assert "USDT" not in log.err and "profiler_start" not in log.err  # libkineto writes them to fd 2: capfd
    assert "Warning" not in log.err  # fall-backs are printed as notes
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["engine"]["minus_outputs"]["top1_points"] == pytest.approx(0, abs=0.5)
    assert len(evaluation["static"]) == 7 and len(evaluation["dynamic"]) == len(evaluation["confidence"])
    # The policy and max-softmax at every multiple of the tolerance (the quick preset's: 0.05).
    assert [row["delta"] for row in evaluation["tolerances"]] == pytest.approx([0.025, 0.05, 0.1, 0.2])
    operating = next(row for row in evaluation["tolerances"] if row["delta"] == pytest.approx(0.05))
    assert operating["policy"]["saving"] == pytest.approx(evaluation["risk_control"]["policy"]["test"]["saving"])
    # The smoke preset learns: well above chance (10 classes) on the whole test split.
    assert evaluation["base"]["accuracy"] > 0.3 and evaluation["static"][-1]["accuracy"] > 0.3
    report = (out / "report.md").read_text()
    assert "| RDN N_K |" in report and "RDN† (dynamic" in report and "## Comparisons" in report
    assert "| policy needs no more MACs |" in report
    assert "Smoke preset (`--quick`)" in report.splitlines()[2]
    assert not re.search(r"\bmet\b|target", report.split("## Comparisons")[1].split("##")[0])
    assert "## Targets" not in report

    started = time.perf_counter()
    assert main(list(options)) == 0
    again = time.perf_counter() - started
    log = capfd.readouterr().out
    assert log.count("done, skipped") == 7  # every step but the report
    assert again < first

    # --ablations on the finished run: only the ablations and the report run.
    assert main([*options, "--ablations"]) == 0
    log = capfd.readouterr().out
    assert log.count("done, skipped") == 7 and "[8/9] ablations" in log
    report = (out / "report.md").read_text()
    for name in ABLATIONS:
        result = json.loads((out / "ablations" / name / "test.json").read_text())
        assert len(result["top1"]) == 7 and all(0.0 <= top1 <= 1.0 for top1 in result["top1"])
        assert result["macs"] == pytest.approx([point["macs"] for point in evaluation["static"]])
        assert f"| {name}: " in report
    # Pretraining and training from scratch use the preset's rate (--lr 0.05); fine-tuning uses --finetune-lr.
    assert peak_lrs == {"base": 0.05, "finetune": 0.02, "random_select": 0.02, "from_scratch": 0.05,
                        "all_but_lightest": 0.02, "largest_only": 0.02}  # fmt: skip
    assert "fine-tuning 1 epoch(s) at peak learning rate 0.02" in report

    # Another setting on the same folder: refused, naming it.
    assert main([*options, "--base-epochs", "2"]) == 2
    assert "base_epochs: 1 -> 2" in capfd.readouterr().err

    # The run is deployable: its policy decides per image.
    images = tmp_path / "images"
    write_test_images(images, count=6)
    assert main(["infer", str(images), "--from", str(out), "--out", str(tmp_path / "p.json")]) == 0
    predictions = json.loads((tmp_path / "p.json").read_text())
    calibration = json.loads((out / "calibration.json").read_text())
    certified = calibration["risk_control"]["policy"]["parameter"]
    # The risk-controlled λ when the calibration certified early exits, else the λ* rule's operating ε.
    expected = "risk-controlled (λ = " if certified is not None else f"ε = {calibration['operating_epsilon']:g}"
    assert len(predictions) == 6 and expected in capfd.readouterr().err
    assert all(1 <= p["exit"] <= 7 and p["macs"] > 0 for p in predictions)


def write_test_images(folder, count: int) -> None:
    """``count`` 28 × 28 grey PNGs of MNIST-5k test digits."""
    from PIL import Image

    from rdn.data import load_dataset

    folder.mkdir(parents=True)
    test = load_dataset("mnist5k").test
    for index in range(count):
        Image.fromarray(test.images[index, 0].numpy()).save(folder / f"digit{index}.png")


@pytest.mark.parametrize("depth_split", [None, 6])
def test_exit_grid_and_nesting_order_cells(depth_split):
    """Exits map to the order's (width, depth) grid and back; with a depth split the grid has two
    columns (shallow, full depth) and the chosen path's exits grow in the engine's exit order."""
    from rdn.order import nesting_order

    torch.manual_seed(0)
    model = create("mobilenet_v2", num_classes=10, input_size=28, in_chans=1, width_mult=0.25)
    net = nest(model, k=2, calib=torch.randn(4, 1, 28, 28), depth_split=depth_split).eval()
    exits = list(range(1, net.num_subnets + 1))
    grid = pipeline.exit_grid(net, [float(e) for e in exits])
    assert (len(grid), len(grid[0])) == (net.num_groups, 1 if depth_split is None else 2)
    cells = [(w, d) for w in range(len(grid)) for d in range(len(grid[0]))]
    assert sorted(pipeline.cell_exit(net, cell) for cell in cells) == exits
    assert all(grid[w][d] == pipeline.cell_exit(net, (w, d)) for w, d in cells)
    macs = pipeline.exit_grid(net, [float(net.macs(e)) for e in exits])
    order = nesting_order(macs, grid)  # accuracy = exit number: every cell is worth visiting
    path_exits = [pipeline.cell_exit(net, cell) for cell in order.path]
    assert path_exits == sorted(path_exits) and path_exits[-1] == net.num_subnets
