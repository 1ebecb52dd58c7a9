"""`make gpu-check`'s plumbing, dry-run on the CPU: every step runs and lands in one results folder."""

from __future__ import annotations

import sys

from benchmarks.bench_nested_conv import BLOCK_SPARSE
from tools import gpu_check


def test_dry_run_runs_every_step_into_one_folder(tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "README.md").read_text()
    steps = [step.name for step in gpu_check.plan_steps(tmp_path, dry_run=True)]
    assert steps == ["self-check", "tests", "kernels NCHW", "kernels channels_last", "training"]
    for step in steps:
        assert f"| {step} | pass |" in summary
    names = {path.name for path in tmp_path.iterdir()}
    assert {"gpu_check_nchw_cpu.md", "gpu_check_nhwc_cpu.md", "training_cost_cpu.md"} <= names
    for table in ("gpu_check_nchw_cpu.md", "gpu_check_nhwc_cpu.md"):  # every peer, block-sparse included
        header = next(line for line in (tmp_path / table).read_text().splitlines() if line.startswith("| shape |"))
        assert all(f"| {peer} |" in header for peer in ("masked dense", "per-stage loop", BLOCK_SPARSE, "grouped"))
    assert "cpp torch.float32: pass" in (tmp_path / "self_check.log").read_text()


def test_the_real_run_builds_first_and_benchmarks_the_gpu(tmp_path):
    steps = gpu_check.plan_steps(tmp_path, dry_run=False)
    assert steps[0].name == "build" and ("FORCE_CUDA", "1") in steps[0].environment
    kernels = [step for step in steps if step.name.startswith("kernels")]
    assert all("gpu-quick" in step.command and "cuda" in step.command for step in kernels)
    assert "-m" in steps[2].command and "cuda" in steps[2].command  # pytest -m cuda
    assert sum(step.limit_s for step in steps) <= 1600  # each bounded; the whole run by --budget-s (480)


def test_a_failing_step_fails_the_check_and_the_budget_stops_later_steps(tmp_path, monkeypatch):
    failing = gpu_check.Step("fails", (sys.executable, "-c", "raise SystemExit(3)"), 30)
    monkeypatch.setattr(gpu_check, "plan_steps", lambda out, dry_run: [failing, failing])
    records = gpu_check.run(tmp_path, dry_run=True, budget_s=60)
    assert [r["status"] for r in records] == ["FAIL (exit 3)", "FAIL (exit 3)"]
    assert gpu_check.run(tmp_path, dry_run=True, budget_s=5)[0]["status"] == "not run (budget spent)"
