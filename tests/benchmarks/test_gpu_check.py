"""`make gpu-check`'s plumbing, dry-run on the CPU: every step runs and lands in one results folder."""

from __future__ import annotations

import sys

import pytest

from benchmarks.bench_nested_conv import BLOCK_SPARSE
from tools import gpu_check


def test_dry_run_runs_every_step_into_one_folder(tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "README.md").read_text()
    steps = [step.name for step in gpu_check.plan_steps(tmp_path, dry_run=True)]
    assert steps == ["self-check", "tests", "kernels-nchw", "kernels-channels-last", "training"]
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


def test_some_steps_only_and_the_summary_after_every_step(tmp_path, monkeypatch):
    """--steps splits the check over two calls of a short loan; the summary is on disk after each
    step, so a call stopped from outside still says how far it got."""
    summary = tmp_path / "README.md"

    def step(name: str) -> gpu_check.Step:  # passes when the summary is already on disk
        check = f"import pathlib, sys; sys.exit(0 if pathlib.Path({str(summary)!r}).exists() else 5)"
        return gpu_check.Step(name, (sys.executable, "-c", check), 30)

    monkeypatch.setattr(gpu_check, "plan_steps", lambda out, dry_run: [step("first"), step("second")])
    records = gpu_check.run(tmp_path, dry_run=True, budget_s=60, only=["second"])
    assert [(r["step"], r["status"]) for r in records] == [("second", "FAIL (exit 5)")]
    summary.unlink()
    records = gpu_check.run(tmp_path, dry_run=True, budget_s=60, only=["first", "second"])
    assert [r["status"] for r in records] == ["FAIL (exit 5)", "pass"]  # the summary came after the first step
    with pytest.raises(ValueError, match="unknown steps"):
        gpu_check.run(tmp_path, dry_run=True, budget_s=60, only=["benchmarks"])
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--steps", "nonsense"]) == 2
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--steps", ","]) == 2


def test_a_failing_step_fails_the_check_and_the_budget_stops_later_steps(tmp_path, monkeypatch):
    failing = gpu_check.Step("fails", (sys.executable, "-c", "raise SystemExit(3)"), 30)
    monkeypatch.setattr(gpu_check, "plan_steps", lambda out, dry_run: [failing, failing])
    records = gpu_check.run(tmp_path, dry_run=True, budget_s=60)
    assert [r["status"] for r in records] == ["FAIL (exit 3)", "FAIL (exit 3)"]
    assert gpu_check.run(tmp_path, dry_run=True, budget_s=5)[0]["status"] == "not run (budget spent)"
