"""benchmarks/pipeline_seeds.py: the per-seed summary reads evaluation.json and checks the targets."""

from __future__ import annotations

import json

from benchmarks.pipeline_seeds import seed_row, summary


def fake_run(folder, saving: float, speed: float, drop: float, sweep: tuple[tuple[float, float], ...] = ()) -> None:
    """An evaluation.json; ``sweep``: (policy saving, max-softmax saving) at each tolerance."""
    folder.mkdir(parents=True)
    static = [{"accuracy": 0.80}, {"accuracy": 0.86}]
    test = {"accuracy_drop_points": drop, "saving": saving, "disagreement": 0.004}
    evaluation = {
        "static": static, "base": {"accuracy": 0.85},
        "measurements": [{"name": "N_2 static", "images_per_second": 1000.0, "peak_bytes": 100},
                         {"name": "dynamic δ=0.005", "images_per_second": speed, "peak_bytes": 150}],
        "risk_control": {"policy": {"test": test},
                         "confidence": {"test": {"accuracy_drop_points": 0.01, "saving": 0.55}}},
        "tolerances": [{"policy": {"saving": ours}, "confidence": {"saving": theirs}} for ours, theirs in sweep],
    }  # fmt: skip
    (folder / "evaluation.json").write_text(json.dumps(evaluation))


def test_summary_reports_median_range_and_misses(tmp_path):
    fake_run(tmp_path / "seed0", saving=0.56, speed=1600.0, drop=0.05, sweep=((0.4, 0.4), (0.56, 0.55)))
    fake_run(tmp_path / "seed1", saving=0.40, speed=1200.0, drop=0.30, sweep=((0.4, 0.5), (0.6, 0.55)))
    rows = {seed: seed_row(tmp_path / f"seed{seed}") for seed in (0, 1)}
    assert rows[0]["speedup"] == 1.6 and rows[0]["memory"] == 1.5 and rows[0]["nk_top1"] == 86.0
    text = summary(rows)
    assert "| median |" in text and "| min |" in text
    assert "- seed 0: saving ≥ 50%: met, drop ≤ 0.2 points: met, ≥ 1.5× images/s: met, no more MACs than " \
           "max-softmax: met, no more MACs than max-softmax at every tolerance (2 of 2): met" in text  # fmt: skip
    assert "- seed 1: saving ≥ 50%: MISSED, drop ≤ 0.2 points: MISSED, ≥ 1.5× images/s: MISSED" in text
    assert "at every tolerance (1 of 2): MISSED" in text


def test_surgery_summary_reads_costs_and_the_chosen_construction(tmp_path):
    """N_K's MACs over the base's, N_K − base, N_1, and the construction recorded in nested.pt."""
    import torch

    from benchmarks.pipeline_seeds import surgery_row, surgery_summary
    from rdn.surgery import nest
    from rdn.train import model_config_of, save_checkpoint
    from tests.surgery.toys import toy

    for seed, (nk_macs, nk_accuracy) in enumerate([(1.15e6, 0.849), (1.3e6, 0.86)]):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        evaluation = {"base": {"accuracy": 0.85, "macs": 1e6},
                      "static": [{"accuracy": 0.80, "macs": 0.3e6}, {"accuracy": nk_accuracy, "macs": nk_macs}]}
        (folder / "evaluation.json").write_text(json.dumps(evaluation))  # fmt: skip
    net = nest(toy(), k=3, calib=torch.randn(8, 3, 10, 10), skip=["stem"])
    save_checkpoint(tmp_path / "seed0" / "nested.pt", {"model_config": model_config_of(net), "model": {}})
    rows = {seed: surgery_row(tmp_path / f"seed{seed}") for seed in (0, 1)}
    assert rows[0]["mac_ratio"] == 1.15 and round(rows[0]["nk_minus_base"], 6) == -0.1
    assert rows[0]["construction"].startswith(f"copy_fraction {net.record.config.copy_fraction:g}, ")
    assert rows[0]["construction"].endswith("× the base's feature maps")
    assert rows[1]["construction"] == ""  # no nested.pt
    text = surgery_summary(rows)
    assert "| 0 | 1.00 | 1.15 | 1.150 | -0.10 | 80.00 | copy_fraction" in text
    assert "- seed 0: N_K ≤ 1.2× the base's MACs: met, N_K within 0.2 points of the base: met" in text
    assert "- seed 1: N_K ≤ 1.2× the base's MACs: MISSED, N_K within 0.2 points of the base: met" in text
