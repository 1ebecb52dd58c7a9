"""The pipeline's operating point over several seeds: median and range, against issue 19's targets.

Runs ``rdn pipeline`` once per seed (each in its own run folder, resumable: a finished seed is
not rerun) and summarises every run's ``evaluation.json`` into one markdown table::

    python -m benchmarks.pipeline_seeds --seeds 0 1 2 --out runs/seeds \\
        --results benchmarks/results/pipeline_seeds_cpu -- --data fashion_mnist --model mobilenet_v2 --k 4

Arguments after ``--`` go to ``rdn pipeline`` unchanged. The summary reports, per seed: N_K's
and the base's test accuracy, the early-exit engine at the certified operating point (accuracy
drop against N_K, fraction of N_K's MACs saved, images/s against static N_K, peak memory against
static N_K), and the max-softmax baseline calibrated the same way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from rdn.experiments.report import nested_record

# issue 19's targets for every seed: at least this saving, at most this drop, at least this speed-up.
TARGET_SAVING = 0.50
TARGET_DROP_POINTS = 0.2
TARGET_SPEEDUP = 1.5
# issue 17's targets for the surgery: N_K at most this many times the base's MACs, within this many points of it.
TARGET_MAC_RATIO = 1.2
TARGET_BASE_GAP_POINTS = 0.2


def run_seed(seed: int, out: Path, pipeline_args: Sequence[str]) -> Path:
    """``rdn pipeline --seed seed`` into ``out/seed<seed>`` (the pipeline resumes a folder holding the
    same settings by itself: finished steps are not rerun); its folder."""
    folder = out / f"seed{seed}"
    command = [sys.executable, "-m", "rdn", "pipeline", *pipeline_args, "--seed", str(seed), "--out", str(folder)]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    return folder


def seed_row(folder: Path) -> dict[str, float]:
    """The numbers of one run's ``evaluation.json`` the summary reports."""
    evaluation = json.loads((folder / "evaluation.json").read_text())
    measurements = {m["name"]: m for m in evaluation["measurements"]}
    static_k = measurements[f"N_{len(evaluation['static'])} static"]
    dynamic = next(m for name, m in measurements.items() if name.startswith("dynamic"))
    policy, confidence = evaluation["risk_control"]["policy"], evaluation["risk_control"]["confidence"]
    return {
        "base_top1": 100 * evaluation["base"]["accuracy"],
        "nk_top1": 100 * evaluation["static"][-1]["accuracy"],
        "n1_top1": 100 * evaluation["static"][0]["accuracy"],
        "drop": policy["test"]["accuracy_drop_points"],
        "saving": policy["test"]["saving"],
        "disagreement": policy["test"]["disagreement"],
        "speedup": dynamic["images_per_second"] / static_k["images_per_second"],
        # the engine's one-step walk (timed since 2026-12-05 noon; None in older runs)
        "jump_speedup": next((m["images_per_second"] / static_k["images_per_second"] for name, m in measurements.items()
                              if name.startswith("dynamic (jump)")), None),
        "memory": dynamic["peak_bytes"] / static_k["peak_bytes"],
        "confidence_saving": confidence["test"]["saving"],
        "confidence_drop": confidence["test"]["accuracy_drop_points"],
        # tolerances of the sweep (evaluated since 2026-12-05 afternoon; none in older runs) at which the
        # policy needs no more MACs than max-softmax, and how many there are
        "tolerance_wins": sum(row["policy"]["saving"] >= row["confidence"]["saving"]
                              for row in evaluation.get("tolerances", [])),
        "tolerances": len(evaluation.get("tolerances", [])),
    }


def surgery_row(folder: Path) -> dict:
    """N_K's cost and accuracy against the base model in one run, and the construction the surgery chose
    (from ``nested.pt``'s record, when the folder has it)."""
    evaluation = json.loads((folder / "evaluation.json").read_text())
    base, static = evaluation["base"], evaluation["static"]
    row = {
        "base_mmacs": base["macs"] / 1e6,
        "nk_mmacs": static[-1]["macs"] / 1e6,
        "mac_ratio": static[-1]["macs"] / base["macs"],
        "nk_minus_base": 100 * (static[-1]["accuracy"] - base["accuracy"]),
        "n1_top1": 100 * static[0]["accuracy"],
        "construction": "",
    }
    record = nested_record(folder)
    if record is not None and record.config.exact:
        row["construction"] = "exact"
    elif record is not None:
        blocks = sum(len(pruned) for pruned in record.pruned_blocks.values())
        row["construction"] = (f"copy_fraction {record.config.copy_fraction:g}, {blocks} blocks dropped"
                               f"{', refit' if record.config.compensate else ''}")  # fmt: skip
        chosen = [candidate.get("activation_ratio") for candidate in record.search or ()
                  if (candidate["copy_fraction"], candidate["compensate"])
                  == (record.config.copy_fraction, record.config.compensate)]  # fmt: skip
        if chosen and chosen[0] is not None:  # recorded by searches since the feature-map budget
            row["construction"] += f", {chosen[0]:.2f}× the base's feature maps"
    return row


def surgery_summary(rows: dict[int, dict]) -> str:
    """Markdown: N_K's MACs and accuracy against the base model per seed, median and range, issue 17's targets."""
    columns = [("base_mmacs", "base MMACs", "{:.2f}"), ("nk_mmacs", "N_K MMACs", "{:.2f}"),
               ("mac_ratio", "N_K / base MACs", "{:.3f}"), ("nk_minus_base", "N_K − base (points)", "{:+.2f}"),
               ("n1_top1", "N_1 top-1 %", "{:.2f}")]  # fmt: skip
    lines = ["| seed | " + " | ".join(title for _, title, _ in columns) + " | construction chosen |",
             "|---|" + "---:|" * len(columns) + "---|"]  # fmt: skip
    for seed, row in sorted(rows.items()):
        cells = " | ".join(form.format(row[key]) for key, _, form in columns)
        lines.append(f"| {seed} | {cells} | {row['construction']} |")
    for name, reduce in (("median", statistics.median), ("min", min), ("max", max)):
        cells = " | ".join(form.format(reduce([row[key] for row in rows.values()])) for key, _, form in columns)
        lines.append(f"| {name} | {cells} | |")
    lines.append("")
    for seed, row in sorted(rows.items()):
        within = row["nk_minus_base"] >= -TARGET_BASE_GAP_POINTS
        met = {f"N_K ≤ {TARGET_MAC_RATIO}× the base's MACs": row["mac_ratio"] <= TARGET_MAC_RATIO,
               f"N_K within {TARGET_BASE_GAP_POINTS} points of the base": within}  # fmt: skip
        lines.append(f"- seed {seed}: " + ", ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in met.items()))
    return "\n".join(lines) + "\n"


def summary(rows: dict[int, dict[str, float]]) -> str:
    """Markdown: one row per seed, then median and range, then the targets met per seed."""
    columns = [("base_top1", "base top-1 %", "{:.2f}"), ("nk_top1", "N_K top-1 %", "{:.2f}"),
               ("n1_top1", "N_1 top-1 %", "{:.2f}"), ("drop", "accuracy drop vs N_K (points)", "{:.2f}"),
               ("saving", "MACs saved", "{:.1%}"), ("disagreement", "disagreement", "{:.2%}"),
               ("speedup", "images/s vs N_K", "{:.2f}×"), ("memory", "peak memory vs N_K", "{:.2f}×"),
               ("confidence_saving", "max-softmax: MACs saved", "{:.1%}"),
               ("confidence_drop", "max-softmax: accuracy drop", "{:.2f}")]  # fmt: skip
    if all(row.get("jump_speedup") is not None for row in rows.values()):
        columns.insert(7, ("jump_speedup", "jump walk: images/s vs N_K", "{:.2f}×"))
    lines = ["| seed | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]  # fmt: skip
    for seed, row in sorted(rows.items()):
        lines.append(f"| {seed} | " + " | ".join(form.format(row[key]) for key, _, form in columns) + " |")
    for name, reduce in (("median", statistics.median), ("min", min), ("max", max)):
        values = [reduce([row[key] for row in rows.values()]) for key, _, _ in columns]
        lines.append(f"| {name} | " + " | ".join(form.format(v) for (_, _, form), v in zip(columns, values,
                                                                                             strict=True)) + " |")
    lines.append("")
    for seed, row in sorted(rows.items()):
        met = {f"saving ≥ {TARGET_SAVING:.0%}": row["saving"] >= TARGET_SAVING,
               f"drop ≤ {TARGET_DROP_POINTS} points": row["drop"] <= TARGET_DROP_POINTS,
               f"≥ {TARGET_SPEEDUP}× images/s": row["speedup"] >= TARGET_SPEEDUP,
               "no more MACs than max-softmax": row["saving"] >= row["confidence_saving"]}  # fmt: skip
        if row.get("jump_speedup") is not None:
            met[f"≥ {TARGET_SPEEDUP}× images/s with the jump walk"] = row["jump_speedup"] >= TARGET_SPEEDUP
        if row.get("tolerances"):
            met[f"no more MACs than max-softmax at every tolerance ({row['tolerance_wins']} of "
                f"{row['tolerances']})"] = row["tolerance_wins"] == row["tolerances"]
        lines.append(f"- seed {seed}: " + ", ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in met.items()))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pipeline_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/seeds"), help="one run folder per seed in here")
    parser.add_argument("--results", type=Path, default=None, help="write summary.md here too")
    parser.add_argument("--summarise-only", action="store_true", help="read the finished runs, run nothing")
    args = parser.parse_args(own)
    rows, surgeries = {}, {}
    for seed in args.seeds:
        folder = args.out / f"seed{seed}" if args.summarise_only else run_seed(seed, args.out, pipeline_args)
        rows[seed], surgeries[seed] = seed_row(folder), surgery_row(folder)
    text = summary(rows) + "\n## The surgery: N_K against the base model\n\n" + surgery_summary(surgeries)
    print(text)
    if args.results is not None:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "summary.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
