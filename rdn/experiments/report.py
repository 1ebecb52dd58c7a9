"""The pipeline's report: ``report.md`` and ``tradeoff.png`` rendered from a run folder's files.

Reads what the steps wrote (``settings.json``, ``evaluation.json``, ``calibration.json``,
``order.json``, ``ablations/*/test.json``) and computes nothing but comparisons between those
numbers, so a report can be rendered again (or differently) without running anything::

    python -m rdn.experiments.report runs/NAME

The report states results and comparisons against the base model, static N_K and the max-softmax
confidence baseline; whether they meet a goal is for the reader (this project's own targets are in
``benchmarks/README.md``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rdn.experiments.config import ABLATIONS, OPERATING_OFFSET, ExperimentConfig
from rdn.files import atomic_write
from rdn.surgery import NestConfig

__all__ = ["comparisons", "nested_record", "plot_tradeoff", "render_report", "surgery_summary", "write_report"]


def write_report(folder: str | Path) -> Path:
    """Render ``report.md`` and ``tradeoff.png`` into the run ``folder``; returns the report's path."""
    folder = Path(folder)
    config = ExperimentConfig.from_dict(_read(folder, "settings.json"))
    evaluation = _read(folder, "evaluation.json")
    plot_tradeoff(folder / "tradeoff.png", evaluation, f"{config.model} RDN, {config.data.dataset}")
    text = render_report(folder)
    return atomic_write(folder / "report.md", lambda tmp: tmp.write_text(text))


def _read(folder: Path, name: str) -> Any:
    return json.loads((folder / name).read_text())


def _mb(value: float) -> str:
    return f"{value / 2**20:.1f}"


def _fewer(saving: float) -> str:
    return f"{100 * abs(saving):.1f} % {'fewer' if saving >= 0 else 'more'}"


def surgery_summary(nest: NestConfig) -> str:
    """The surgery's options in words (mode, selection, exactness, copies, budget, refit, depth split)."""
    parts = [nest.mode, f"{nest.select} select"]
    if nest.mode == "expand":
        parts.append("exact" if nest.exact else "not exact (at most two copies)")
    if nest.mac_budget is not None:
        parts.append(f"N_K at most {nest.mac_budget:g}× the base model's MACs")
    if nest.activation_budget is not None:
        parts.append(f"N_K at most {nest.activation_budget:g}× the base model's feature maps")
    searched = nest.mac_budget is not None  # unset choices mean the search's otherwise (NestConfig.resolved)
    if nest.copy_fraction is None and searched:
        parts.append("share of copied channels chosen by the budget's search")
    elif nest.copy_fraction is not None and nest.copy_fraction < 1:
        parts.append(f"copies for {nest.copy_fraction:g} of each group's channels")
    if nest.compensate is None and searched:
        parts.append("least-squares refit chosen by the budget's search")
    elif nest.compensate:
        parts.append("incomplete copies refitted by least squares")
    if nest.depth_split is not None:
        parts.append(f"a shallow exit per width after block {nest.depth_split}")
    return ", ".join(parts)


def nested_record(folder: str | Path):
    """The :class:`~rdn.surgery.NestRecord` of a run folder's ``nested.pt`` (what the surgery built, the
    budget's search resolved; any record version), read weights-only; ``None`` when the file is not there."""
    path = Path(folder) / "nested.pt"
    if not path.is_file():
        return None
    from rdn.surgery import NestRecord
    from rdn.train import load_checkpoint

    return NestRecord.read(load_checkpoint(path)["model_config"]["rdn_config"])


def _chosen_surgery(folder: Path, options: NestConfig) -> str:
    """``surgery_summary`` of what the surgery built (:func:`nested_record`), with the blocks it dropped;
    the settings' options when the folder has no ``nested.pt``."""
    record = nested_record(folder)
    if record is None:
        return surgery_summary(options)
    text = surgery_summary(record.config)
    blocks = sum(len(pruned) for pruned in record.pruned_blocks.values())
    if record.search is not None:
        text += f" (chosen by the budget's search among {len(record.search)} candidates)"
    return text + (f"; {blocks} blocks of the added groups dropped" if blocks else "")


def _training_summary(config: ExperimentConfig) -> str:
    steps = "the whole split" if config.steps_per_epoch is None else f"at most {config.steps_per_epoch} steps"
    lr = "" if config.lr is None else f", peak learning rate {config.lr:g}"
    finetune_lr = "" if config.finetune_lr is None else f" at peak learning rate {config.finetune_lr:g}"
    return (f"base {config.base_epochs} epoch(s){lr}, fine-tuning {config.finetune_epochs} epoch(s){finetune_lr}, "
            f"{steps} of {config.batch_size} images per epoch")  # fmt: skip


def comparisons(evaluation: dict) -> list[str]:
    """The run's results against static N_K, the base model and the confidence baseline, as sentences."""
    static_k, engine, base = evaluation["static"][-1], evaluation["engine"], evaluation["base"]
    measurements = {m["name"]: m for m in evaluation["measurements"]}
    dynamic_timing = next(m for m in evaluation["measurements"] if m["name"].startswith("dynamic"))
    static_timing = measurements[f"N_{len(evaluation['static'])} static"]
    lines = [
        f"- Dynamic inference at the operating point ({_operating(evaluation)}, run by the early-exit engine) "
        f"against static N_K: top-1 {100 * engine['accuracy']:.2f} % vs {100 * static_k['accuracy']:.2f} % "
        f"({100 * (engine['accuracy'] - static_k['accuracy']):+.2f} points), {engine['macs'] / 1e6:.2f} vs "
        f"{static_k['macs'] / 1e6:.2f} MMACs per image ({_fewer(engine['saving'])}).",
        f"- Against the base model ({100 * base['accuracy']:.2f} %, {base['macs'] / 1e6:.2f} MMACs): static N_K "
        f"{100 * (static_k['accuracy'] - base['accuracy']):+.2f} points at {static_k['macs'] / base['macs']:.2f}× its "
        f"MACs; dynamic inference {100 * (engine['accuracy'] - base['accuracy']):+.2f} points at "
        f"{engine['macs'] / base['macs']:.2f}× its MACs.",
        f"- Wall clock (batch {dynamic_timing['batch_size']}): dynamic inference "
        f"{dynamic_timing['images_per_second']:.1f} images/s, static N_K {static_timing['images_per_second']:.1f} "
        f"images/s ({dynamic_timing['images_per_second'] / static_timing['images_per_second']:.2f}×)"
        + "".join(f"; {m['name'].split(' δ=')[0].removeprefix('dynamic ').strip('()')} walk "
                  f"{m['images_per_second']:.1f} images/s "
                  f"({m['images_per_second'] / static_timing['images_per_second']:.2f}×)"
                  for m in evaluation["measurements"] if m["name"].startswith("dynamic (")) + ".",
    ]  # fmt: skip
    lines += _risk_control_lines(evaluation)
    # At equal accuracy: the cheapest confidence point (or static N_K) at least as accurate on the test split.
    rivals = evaluation["confidence"] + [static_k]
    pairs = []
    for point in evaluation["dynamic"]:
        cheaper = [rival["macs"] for rival in rivals if rival["accuracy"] >= point["accuracy"]]
        if point["parameter"] is not None and cheaper:
            pairs.append((point, min(cheaper)))
    if not pairs:
        lines.append("- Against the max-softmax confidence baseline: no calibrated dynamic point to compare (every ε "
                     "fell back to N_K).")  # fmt: skip
        return lines
    wins = sum(point["macs"] < rival for point, rival in pairs)
    details = ", ".join(f"{100 * point['accuracy']:.2f} %: {point['macs'] / 1e6:.2f} vs {rival / 1e6:.2f}"
                        for point, rival in pairs)  # fmt: skip
    lines.append(f"- Against the max-softmax confidence baseline at equal accuracy (the cheapest baseline point, or "
                 f"static N_K, at least as accurate on the test split; top-1: dynamic vs baseline MMACs): {details}. "
                 f"Dynamic inference needs fewer MACs at {wins} of these {len(pairs)} accuracies.")  # fmt: skip
    return lines


def _operating(evaluation: dict) -> str:
    """The operating point in words: the risk-controlled one, or the λ* rule's ε of older runs."""
    controlled = evaluation.get("risk_control")
    if controlled is None:
        return f"ε = {evaluation['engine']['epsilon']:.4f}"
    policy = controlled["policy"]
    lam = "N_K for every image" if policy["parameter"] is None else f"λ = {policy['parameter']:.4g}"
    return f"δ = {policy['delta']:g} tolerated disagreement with N_K at confidence {1 - policy['alpha']:g}, {lam}"


def _risk_control_lines(evaluation: dict) -> list[str]:
    """What the risk-controlled calibration guarantees, what it and the rules compared with it achieved."""
    controlled = evaluation.get("risk_control")
    if controlled is None:
        return []

    def achieved(test: dict) -> str:
        change = 0.0 - test["accuracy_drop_points"] + 0.0  # + 0.0: no "-0.00"
        return (f"top-1 {100 * test['accuracy']:.2f} % ({change:+.2f} points against N_K), "
                f"{_fewer(test['saving'])} MACs, "
                f"{100 * test['disagreement']:.2f} % of test images predicted differently from N_K")  # fmt: skip

    policy, confidence, star = controlled["policy"], controlled["confidence"], controlled["lambda_star"]
    within = "within" if policy["test"]["disagreement"] <= policy["delta"] else "beyond"
    return [
        f"- Guaranteed by the calibration ({policy['n']} calibration images, labels unused): {policy['guarantee']}. "
        f"On the calibration images: {100 * policy['risk']:.2f} % disagreement, {_fewer(policy['saving'])} MACs. "
        f"Achieved on the test split: {achieved(policy['test'])} ({within} δ).",
        f"- The max-softmax confidence baseline calibrated the same way (τ = "
        f"{'N_K' if confidence['parameter'] is None else format(confidence['parameter'], '.4g')}): "
        f"{achieved(confidence['test'])}.",
        f"- The paper's λ* rule at ε = {star['epsilon']:.4f} (calibration accuracy ≥ 1 − ε, no guarantee; λ* = "
        f"{'N_K (fallback)' if star['parameter'] is None else format(star['parameter'], '.4g')}): "
        f"{achieved(star['test'])}.",
    ]


def render_report(folder: str | Path) -> str:
    """The markdown of a finished run's report (module docstring)."""
    folder = Path(folder)
    config = ExperimentConfig.from_dict(_read(folder, "settings.json"))
    evaluation, calibration = _read(folder, "evaluation.json"), _read(folder, "calibration.json")
    order = _read(folder, "order.json")
    base, static, engine = evaluation["base"], evaluation["static"], evaluation["engine"]
    k = len(static)
    memory = {m["name"]: m for m in evaluation["measurements"]}
    dynamic_memory = next(m for m in evaluation["measurements"] if m["name"].startswith("dynamic"))
    batch = dynamic_memory["batch_size"]
    params = evaluation["params"]
    lines = [
        f"# RDN pipeline report: {config.model} (width {config.width_mult}), k = {config.nest.k} (K = {k}), "
        f"{config.data.dataset}",
        "",
    ]
    if config.preset == "quick":
        lines += ["> Smoke preset (`--quick`): a few training steps per stage. It checks that every step runs end to "
                  "end; its numbers do not measure the method (run without `--quick` for that).", ""]  # fmt: skip
    lines += [
        f"Data: {evaluation.get('data', config.data.dataset)}. Trained and evaluated on {evaluation['device']}; timed "
        f"on {evaluation['bench_device']} ({evaluation['cpu']}, {evaluation['threads']} torch threads). Preset: "
        f"{config.preset}; {_training_summary(config)}. Surgery: {_chosen_surgery(folder, config.nest)}.",
        "",
        "## Table 1 (form of the paper's Table 1)",
        "",
        f"Memory: measured peak bytes allocated while running one batch of {batch} test images (CPU: torch "
        "profiler allocation events; CUDA: max_memory_allocated). MACs: average per image.",
        "",
        "| Model | Peak mem (MB) | MMACs | Params (M) | Top-1 (%) | Top-5 (%) | Integrated nets |",
        "|---|---:|---:|---:|---:|---:|---|",
        f"| base {config.model} | {_mb(memory['base']['peak_bytes'])} | {base['macs'] / 1e6:.2f} | "
        f"{base['params'] / 1e6:.3f} | {100 * base['accuracy']:.2f} | {100 * base['top5']:.2f} | 1 full network |",
        f"| RDN N_K | {_mb(memory[f'N_{k} static']['peak_bytes'])} | {static[-1]['macs'] / 1e6:.2f} | "
        f"{params['N_K'] / 1e6:.3f} | {100 * static[-1]['accuracy']:.2f} | {100 * static[-1]['top5']:.2f} | "
        f"{k} sub-networks |",
        f"| RDN† (dynamic, {_operating(evaluation).split(',')[0]}) | {_mb(dynamic_memory['peak_bytes'])} | "
        f"{engine['macs'] / 1e6:.2f} | {(params['N_K'] + params['policy']) / 1e6:.3f} | "
        f"{100 * engine['accuracy']:.2f} | {100 * engine['top5']:.2f} | {k} sub-networks |",
        "",
        "RDN† is measured with the real early-exit engine over the whole test split; minus the same rule computed "
        f"from the per-exit outputs: top-1 {engine['minus_outputs']['top1_points']:+.2f} points, "
        f"{engine['minus_outputs']['macs'] / 1e6:+.3f} MMACs. Its MACs include the policy MLP's "
        f"({params['policy']} parameters).",
        "",
        "## Comparisons",
        "",
        *comparisons(evaluation),
        "",
        "## Accuracy–MACs trade-off (form of the paper's Figure 8)",
        "",
        "![trade-off](tradeoff.png)",
        "",
        "Dynamic and confidence rows: each ε calibrated on the calibration split (λ* resp. τ), applied to the test "
        "split; computed from every exit's per-sample test outputs (the engine row above runs its ε for real).",
        "",
        *_tradeoff_table(static + evaluation["dynamic"] + evaluation["confidence"]),
        "",
        f"## Wall clock and memory (batch {batch}, median of {config.repeats} interleaved rounds)",
        "",
        "| Run | Images/s | Peak mem (MB) |",
        "|---|---:|---:|",
        *(f"| {m['name']} | {m['images_per_second']:.1f} | {_mb(m['peak_bytes'])} |"
          for m in evaluation["measurements"]),  # fmt: skip
        "",
        "## Nesting order",
        "",
        f"Sub-networks on a {order['grid']} grid (width groups x depth columns). "
        f"Chosen order: {' -> '.join(order['names'])}; area {order['area']:.4g} = "
        f"{100 * order['hull_ratio']:.2f} % of the upper convex hull's (hull: {', '.join(order['hull_names'])}).",
        "",
        "![nesting order](order.png)",
        "",
        "## Calibration",
        "",
        *_calibration_lines(calibration),
        *_tolerance_lines(evaluation),
        f"The paper's rule: (ε, λ*) pairs (stored in policy.pt and calibration.json); its compared ε = "
        f"{calibration['operating_epsilon']:.4f} (the ε nearest N_K's calibration error + {OPERATING_OFFSET}). The "
        f"policy may exit at {', '.join(f'N_{s}' for s in calibration['exits'])}; the confidence baseline at every "
        "exit.",
        "",
        "## Ablations",
        "",
        *_ablation_lines(config, static, _ablations(folder)),
    ]
    return "\n".join(lines) + "\n"


def _calibration_lines(calibration: dict) -> list[str]:
    """The risk-controlled operating point's calibration (runs before it existed have none)."""
    controlled = calibration.get("risk_control")
    if controlled is None:
        return []
    rows = ["| Rule | δ | α | Parameter | Calibration disagreement | p-value | Candidates tested | Saving |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, result in (("policy (λ)", controlled["policy"]), ("confidence (τ)", controlled["confidence"])):
        parameter = "N_K" if result["parameter"] is None else f"{result['parameter']:.4g}"
        p_value = "" if result["p_value"] is None else f"{result['p_value']:.3g}"
        rows.append(f"| {name} | {result['delta']:g} | {result['alpha']:g} | {parameter} | "
                    f"{100 * result['risk']:.2f} % | {p_value} | {result['tested']} | "
                    f"{100 * result['saving']:.1f} % |")  # fmt: skip
    return [
        "Operating point: Learn-then-Test (fixed-sequence testing over a grid of λ resp. τ from always-N_K to the "
        "most aggressive, exact binomial p-value of H0 'disagreement with N_K > δ', rdn.calibration) on the "
        f"calibration split's {controlled['policy']['n']} images. Guarantee: {controlled['policy']['guarantee']}.",
        "",
        *rows,
        "",
    ]


def _tolerance_lines(evaluation: dict) -> list[str]:
    """The policy against the max-softmax rule at every tolerance of the sweep (runs before it have none)."""
    rows = evaluation.get("tolerances") or []
    if not rows:
        return []

    def cells(test: dict) -> str:
        return (f"{100 * test['saving']:.1f} % | {0.0 - test['accuracy_drop_points'] + 0.0:+.2f} | "
                f"{100 * test['disagreement']:.2f} %")  # fmt: skip

    lines = ["Every tolerance, each calibrated the same way (its own Learn-then-Test at α = "
             f"{rows[0]['alpha']:g} on the calibration split), measured on the test split:",
             "",
             "| δ | policy: MACs saved | points vs N_K | disagreement | max-softmax: MACs saved | points vs N_K | "
             "disagreement | policy needs no more MACs |",
             "|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for row in rows:
        wins = row["policy"]["saving"] >= row["confidence"]["saving"]
        lines.append(f"| {row['delta']:g} | {cells(row['policy'])} | {cells(row['confidence'])} | "
                     f"{'yes' if wins else 'no'} |")  # fmt: skip
    return [*lines, ""]


def _tradeoff_table(points: list[dict]) -> list[str]:
    rows = ["| Rule | ε | λ* / τ | Top-1 (%) | Top-5 (%) | MMACs | Saving vs N_K | Exit fractions |",
            "|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for point in points:
        epsilon = "" if point["epsilon"] is None else f"{point['epsilon']:.4f}"
        if point["epsilon"] is not None and point["parameter"] is None:
            parameter = "N_K (fallback)"
        else:
            parameter = "" if point["parameter"] is None else f"{point['parameter']:.4g}"
        fractions = " ".join(f"{f:.2f}" for f in point["exit_fractions"])
        rows.append(f"| {point['name']} | {epsilon} | {parameter} | {100 * point['accuracy']:.2f} | "
                    f"{100 * point['top5']:.2f} | {point['macs'] / 1e6:.2f} | {100 * point['saving']:.1f} % | "
                    f"{fractions} |")  # fmt: skip
    return rows


def _ablations(folder: Path) -> dict[str, dict]:
    """The ablations' results that exist, in :data:`ABLATIONS` order."""
    return {name: _read(folder, f"ablations/{name}/test.json") for name in ABLATIONS
            if (folder / "ablations" / name / "test.json").is_file()}  # fmt: skip


def _ablation_lines(config: ExperimentConfig, static: list[dict], ablations: dict[str, dict]) -> list[str]:
    if not ablations:
        return ["Not run (`rdn pipeline ... --ablations` runs them: random select, from scratch, exit subsets)."]
    k = len(static)
    rows = [
        "| Variant | Fine-tuning epochs | " + " | ".join(f"N_{s}" for s in range(1, k + 1)) + " |",
        "|---|---:|" + "---:|" * k,
        f"| main run: {config.nest.select} select, pretrained base, every exit in the loss | {config.finetune_epochs} "
        "| " + " | ".join(f"{100 * point['accuracy']:.2f}" for point in static) + " |",
    ]
    for name, result in ablations.items():
        rows.append(f"| {name}: {result['description']} | {result['epochs']} | "
                    + " | ".join(f"{100 * top1:.2f}" for top1 in result["top1"]) + " |")  # fmt: skip
    return [
        "Top-1 (%) of every sub-network on the test split; each variant changes one thing of the main run and is "
        f"trained with its settings ({_training_summary(config)}).",
        "",
        *rows,
    ]


def plot_tradeoff(path: str | Path, evaluation: dict, title: str) -> None:
    """The paper's Figure 8: static sub-networks, dynamic inference per ε, the confidence baseline, the base."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(points):
        return [p["macs"] / 1e6 for p in points], [100 * p["accuracy"] for p in points]

    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    axes.plot(*series(evaluation["static"]), "o-", color="tab:blue", label="RDN sub-networks N_1..N_K (static)")
    for point in evaluation["static"]:
        axes.annotate(point["name"], (point["macs"] / 1e6, 100 * point["accuracy"]), fontsize=7,
                      xytext=(3, -9), textcoords="offset points")  # fmt: skip
    axes.plot(*series(evaluation["confidence"]), "^--", color="tab:green", label="max-softmax confidence exits")
    axes.plot(*series(evaluation["dynamic"]), "o", color="red", label="RDN dynamic inference (per ε)")
    base = evaluation["base"]
    axes.plot([base["macs"] / 1e6], [100 * base["accuracy"]], "*", color="black", markersize=12, label="base model")
    axes.set_xlabel("average MMACs per image")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
    plt.close(figure)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m rdn.experiments.report RUN_FOLDER")
    print(write_report(sys.argv[1]))
