"""benchmarks/pipeline_seeds.py: the per-seed summary reads evaluation.json and checks the targets."""

from __future__ import annotations

import json

from benchmarks.pipeline_seeds import seed_row, summary


def fake_run(folder, saving: float, speed: float, drop: float) -> None:
    folder.mkdir(parents=True)
    static = [{"accuracy": 0.80}, {"accuracy": 0.86}]
    test = {"accuracy_drop_points": drop, "saving": saving, "disagreement": 0.004}
    evaluation = {
        "static": static, "base": {"accuracy": 0.85},
        "measurements": [{"name": "N_2 static", "images_per_second": 1000.0, "peak_bytes": 100},
                         {"name": "dynamic δ=0.005", "images_per_second": speed, "peak_bytes": 150}],
        "risk_control": {"policy": {"test": test},
                         "confidence": {"test": {"accuracy_drop_points": 0.01, "saving": 0.55}}},
    }  # fmt: skip
    (folder / "evaluation.json").write_text(json.dumps(evaluation))


def test_summary_reports_median_range_and_misses(tmp_path):
    fake_run(tmp_path / "seed0", saving=0.56, speed=1600.0, drop=0.05)
    fake_run(tmp_path / "seed1", saving=0.40, speed=1200.0, drop=0.30)
    rows = {seed: seed_row(tmp_path / f"seed{seed}") for seed in (0, 1)}
    assert rows[0]["speedup"] == 1.6 and rows[0]["memory"] == 1.5 and rows[0]["nk_top1"] == 86.0
    text = summary(rows)
    assert "| median |" in text and "| min |" in text
    assert "- seed 0: saving ≥ 50%: met, drop ≤ 0.2 points: met, ≥ 1.5× images/s: met, no more MACs than " \
           "max-softmax: met" in text  # fmt: skip
    assert "- seed 1: saving ≥ 50%: MISSED, drop ≤ 0.2 points: MISSED, ≥ 1.5× images/s: MISSED" in text
