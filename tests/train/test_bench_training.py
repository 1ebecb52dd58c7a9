"""Plumbing of benchmarks/bench_training.py on a tiny model (timings themselves are not checked)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_training import make_step, report_runs, run
from benchmarks.harness import TIMING_PRESETS
from rdn.cli import main
from tests.train.helpers import tiny_rdn


def test_training_cost_table(tmp_path):
    rows = run(torch.device("cpu"), width_mult=0.1, k=2, batch=8, timing=TIMING_PRESETS["tiny"], out=tmp_path,
               mac_budget=1.05, copy_fractions=(0.25, 0.5), runs=2)  # fmt: skip
    assert [row["step"][:3] for row in rows] == ["(a)", "(b)", "(c)", "(d)", "(e)", "(f)", "(g)", "(h)", "(h)", "(i)"]
    macs = [row["forward_macs_per_image"] for row in rows]
    elements = [row["elements_vs_base"] for row in rows]
    assert macs[2] > macs[1] == macs[3]  # separate passes redo the work; N_K alone is the joint pass's work
    assert macs[1] <= 1.05 * macs[0] < macs[6] < macs[4]  # the default budget bites; exact costs the most
    assert macs[5] <= 1.05 * macs[0] and elements[1] <= 1.1  # each budget holds
    assert macs[9] < macs[7] < macs[8] < macs[6]  # fewer copies, fewer MACs; truncate: none
    assert elements[0] == 1 and elements[9] == pytest.approx(1) and elements[2] > 2  # truncate: the base's channels
    assert rows[9]["step"].endswith("2 exits in one pass")  # truncate: K = k
    text = (tmp_path / "training_cost_cpu.md").read_text()
    assert "(c) / (b) ≥ K/2 = 1.5" in text and "| torch |" in text
    assert "Spread: 2 runs in a row" in text and "(h) no budget, copy_fraction=0.5 " in text
    assert "(b) RDN (mac_budget=1.05, activation_budget=1.1) joint" in text
    for surgery in ("(e) exact=True", "(f) MAC budget only", "(g) no budget", "(h) no budget, copy_fraction=0.25",
                    "(h) no budget, copy_fraction=0.5", "(i) truncate (no copies)"):  # fmt: skip
        assert f"| {surgery} ≤ 1.2 × (a) |" in text
    assert (tmp_path / "training_cost_cpu.csv").read_text().startswith("step,median_ms")


def test_separate_step_accumulates_every_subnet():
    model = tiny_rdn()
    x, y = torch.randn(4, 1, 16, 16), torch.randint(10, (4,))
    before = [head.weight.detach().clone() for head in model.heads]
    make_step(model, x, y, "separate")()
    assert all(not torch.equal(b, head.weight) for b, head in zip(before, model.heads, strict=True))


def test_report_of_a_run_trio(tmp_path):
    tiny = ["--data", "synthetic", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "16", "--no-progress"]
    model = ["--model", "mobilenet_v2", "--width-mult", "0.1"]
    assert main(["pretrain", *model, *tiny, "--out", str(tmp_path / "a")]) == 0
    assert main(["nest", "--from", str(tmp_path / "a"), "--k", "2", "--data", "synthetic", "--calib-samples", "8",
                 "--out", str(tmp_path / "b")]) == 0  # fmt: skip
    assert main(["finetune", "--from", str(tmp_path / "b"), *tiny, "--out", str(tmp_path / "c")]) == 0
    text = report_runs(tmp_path / "a", tmp_path / "b", tmp_path / "c", "toy", tmp_path / "results")
    assert (tmp_path / "results" / "training_toy.md").read_text() == text
    exits = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| N_")]
    assert exits == ["N_1", "N_2", "N_3"]
