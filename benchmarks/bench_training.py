"""Training cost of an RDN: one joint pass for all K exits against the base model and K separate passes.

    python -m benchmarks.bench_training [--device cpu|cuda] [--width-mult 0.5] [--k 4] [--batch 64]
                                        [--mac-budget 1.2] [--activation-budget 1.1]
                                        [--copy-fractions 0.25 0.5]
                                        [--runs 3] [--quick] [--out benchmarks/results]
    python -m benchmarks.bench_training --report-runs runs/base runs/rdn runs/ft --name NAME

The second form writes no timings: it tabulates the accuracy and MACs of every exit from the
``summary.json`` of an ``rdn pretrain`` / ``rdn nest`` / ``rdn finetune`` run trio into
``training_<NAME>.md``.

Times one optimisation step (zero_grad, forward, loss, backward, SGD step) of

- (a) the base model (MobileNetV2 small-input variant, 1×28×28 images, 10 classes);
- (b) its RDN as ``rdn.nest`` makes it by default (``nest(k, mac_budget=1.2, activation_budget=1.1)``:
  expand, K = 2k - 1, N_K at most 1.2x the base's MACs and 1.1x its feature-map elements, the
  construction chosen by the budget's search) trained jointly: one forward of N_K gives all K
  logits, one backward of Σ_s CE_s / K (the package's training loop);
- (c) the same RDN trained the OFA / slimmable way: for each s, ``forward(x, subnet=s)`` and its
  own backward, gradients accumulated, then one SGD step;
- (d) the same RDN training N_K alone (``forward(x, subnet=K)``, one CE): the cost of the largest
  sub-network, which isolates what the K - 1 extra exits of (b) add;
- (e)–(i) as (b) for the other surgeries: (e) ``exact=True`` (every connection kept: N_K is exactly
  the base model before fine-tuning, at about twice its MACs); (f) ``activation_budget=None`` (the
  MAC budget alone: the search may keep more channels and drop blocks instead); (g)
  ``mac_budget=None`` (at most two copies of a channel, every copy and block kept); (h)
  ``copy_fraction`` without a budget (only that share of each group's channels get copies: fewer
  channels; one row per fraction); (i) ``mode="truncate"`` (K = k, no copies at all: the least an
  RDN of this base can cost).

Claims checked (DESIGN.md §1): (b) ≤ 1.2 × (a), (c) / (b) ≥ K / 2, and (b) ≤ 1.2 × (d); (e)–(i)
≤ 1.2 × (a) beside them. All run in one interleaved measurement (:mod:`benchmarks.harness`). The
forward MACs and feature-map elements per image are printed beside, so the time ratios can be read
against the work ratios.
Writes ``training_cost_<device>.md`` and ``.csv`` with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.harness import TIMING_PRESETS, TimingConfig, device_tag, machine_info, measure
from rdn.models import create, profile_model
from rdn.surgery import RussianDollNet, costs, nest
from rdn.train import JointLoss, TrainConfig, exit_weights

RESULTS = Path(__file__).resolve().parent / "results"


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str) -> Callable[[], None]:
    """One optimisation step of ``model`` on (x, y); ``mode``: base, joint, separate or largest."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)
    model.train()
    if mode == "joint":
        loss_fn = JointLoss(exit_weights(model.num_subnets))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if mode == "base":
            F.cross_entropy(model(x), y).backward()
        elif mode == "joint":
            loss_fn(model(x), y)[0].backward()
        elif mode == "largest":
            F.cross_entropy(model(x, subnet=model.num_subnets), y).backward()
        else:
            for s in range(1, model.num_subnets + 1):
                (F.cross_entropy(model(x, subnet=s), y) / model.num_subnets).backward()
        optimizer.step()

    return step


def other_surgeries(copy_fractions: Sequence[float], mac_budget: float = 1.2) -> dict[str, dict]:
    """Rows (e)–(i): label → the ``nest`` arguments besides the common ones (k, mode, select, calib)."""
    rows = {"(e) exact=True": dict(exact=True),
            "(f) MAC budget only": dict(mac_budget=mac_budget, activation_budget=None),
            "(g) no budget": dict(mac_budget=None)}  # fmt: skip
    for fraction in copy_fractions:
        rows[f"(h) no budget, copy_fraction={fraction:g}"] = dict(mac_budget=None, copy_fraction=fraction)
    rows["(i) truncate (no copies)"] = dict(mode="truncate")
    return rows


def run(device: torch.device, width_mult: float, k: int, batch: int, timing: TimingConfig, out: Path,
        mac_budget: float = 1.2, copy_fractions: Sequence[float] = (0.25, 0.5), runs: int = 1,
        activation_budget: float | None = 1.1) -> list[dict]:  # fmt: skip
    """Time every row ``runs`` times in a row (each an interleaved measurement); the table is the last run's."""
    torch.manual_seed(0)
    kwargs = {"name": "mobilenet_v2", "num_classes": 10, "input_size": 28, "in_chans": 1, "width_mult": width_mult}
    base = create(**kwargs).to(device)
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(10, (batch,), device=device)
    budgets = dict(mac_budget=mac_budget, activation_budget=activation_budget)
    rdn = nest(base, k=k, mode="expand", select="greedy", calib=x[:32], base=kwargs, **budgets).to(device)
    separate, largest = (RussianDollNet.from_config(rdn.record, base).to(device) for _ in range(2))
    for copy in (separate, largest):
        copy.load_state_dict(rdn.state_dict())
    K = rdn.num_subnets
    models = {
        "(a) base": (base, "base"),
        f"(b) RDN (mac_budget={mac_budget:g}, activation_budget={activation_budget}) joint, {K} exits in one pass":
            (rdn, "joint"),
        f"(c) RDN separate, {K} forward/backward passes": (separate, "separate"),
        f"(d) RDN N_{K} alone": (largest, "largest"),
    }
    surgeries = {}  # row name → the surgery's label, for the claims
    for label, changes in other_surgeries(copy_fractions, mac_budget).items():
        settings = dict(k=k, mode="expand", select="greedy", calib=x[:32], base=kwargs) | changes
        cheaper = nest(base, **settings).to(device)
        name = f"{label} joint, {cheaper.num_subnets} exits in one pass"
        models[name], surgeries[name] = (cheaper, "joint"), label
    steps = {name: make_step(model, x, y, mode) for name, (model, mode) in models.items()}
    started = time.strftime("%H:%M", time.gmtime())
    spread: dict[str, list[float]] = {name: [] for name in models}  # × base time of every run
    for _ in range(runs):
        timings = measure(steps, device, timing)
        for name in models:
            spread[name].append(timings[name].median_ms / timings["(a) base"].median_ms)
    per_run = ", ".join(f"{surgeries.get(name, name[:3])} " + " / ".join(f"{v:.2f}" for v in spread[name])
                        for name in list(models)[1:])  # fmt: skip
    spread_note = (f"{runs} runs in a row, {started}–{time.strftime('%H:%M', time.gmtime())} UTC; the table is the "
                   f"last: × base time {per_run}")  # fmt: skip
    base_macs = profile_model(base.eval(), (1, 1, 28, 28)).macs
    base_elements = costs.base_activation_elements(rdn.plan)
    rows = []
    reference = timings["(a) base"].median_ms
    for name, (model, mode) in models.items():
        if mode == "base":
            work, elements = base_macs, base_elements
        else:
            exits = range(1, model.num_subnets + 1) if mode == "separate" else [model.num_subnets]
            work = sum(model.macs(s) for s in exits)
            elements = sum(costs.activation_elements(model.plan, s) for s in exits)
        timing_ = timings[name]
        rows.append({"step": name, "median_ms": timing_.median_ms, "q25_ms": timing_.q25_ms, "q75_ms": timing_.q75_ms,
                     "vs_base": timing_.median_ms / reference, "forward_macs_per_image": work,
                     "macs_vs_base": work / base_macs, "feature_map_elements_per_image": elements,
                     "elements_vs_base": elements / base_elements})  # fmt: skip
    joint, separate_ms, largest_ms = rows[1]["median_ms"], rows[2]["median_ms"], rows[3]["median_ms"]
    checks = [
        ("(b) ≤ 1.2 × (a)", rows[1]["vs_base"], "≤ 1.2", rows[1]["vs_base"] <= 1.2),
        (f"(c) / (b) ≥ K/2 = {K / 2:g}", separate_ms / joint, f"≥ {K / 2:g}", separate_ms / joint >= K / 2),
        ("(b) ≤ 1.2 × (d)", joint / largest_ms, "≤ 1.2", joint / largest_ms <= 1.2),
    ]
    checks += [(f"{surgeries[row['step']]} ≤ 1.2 × (a)", row["vs_base"], "≤ 1.2", row["vs_base"] <= 1.2)
               for row in rows[4:]]  # fmt: skip
    write(out, device, kwargs, k, K, batch, rows, checks, spread_note if runs > 1 else None)
    return rows


def write(out: Path, device, kwargs, k, K, batch, rows, checks, spread_note: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tag = device_tag(device)
    with open(out / f"training_cost_{tag}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    info = machine_info(device)
    lines = [
        f"# Training cost of one optimisation step ({tag})",
        "",
        f"MobileNetV2 small-input variant, width {kwargs['width_mult']}, 1×28×28 images, batch {batch}, "
        f"RDN: k = {k}, expand, greedy → K = {K} exits unless the row says otherwise. "
        "`python -m benchmarks.bench_training` (interleaved rounds, median and quartiles).",
        "",
        "| step | median ms | q25–q75 ms | × base time | forward MACs / image | × base MACs | × base feature maps |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['step']} | {row['median_ms']:.1f} | {row['q25_ms']:.1f}–{row['q75_ms']:.1f} | "
                     f"{row['vs_base']:.2f} | {row['forward_macs_per_image'] / 1e6:.1f} M | "
                     f"{row['macs_vs_base']:.2f} | {row['elements_vs_base']:.2f} |")  # fmt: skip
    lines += [
        "",
        f"The joint step costs {rows[1]['median_ms'] / rows[3]['median_ms']:.2f}× training N_K alone, which is what "
        f"the other {K - 1} exits add; separate passes cost {rows[2]['median_ms'] / rows[1]['median_ms']:.2f}× the "
        "joint step.",
    ]
    if spread_note:
        lines += ["", f"Spread: {spread_note}."]
    lines += ["", "| claim | measured | target | met |", "|---|---:|---:|---|"]
    for name, value, target, ok in checks:
        lines.append(f"| {name} | {value:.2f} | {target} | {'yes' if ok else '**no**'} |")
    lines += ["", "| machine | |", "|---|---|"] + [f"| {key} | {value} |" for key, value in info.items()]
    (out / f"training_cost_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _summary(folder: Path) -> dict:
    import json

    return json.loads((folder / "summary.json").read_text())


def report_runs(base_dir: Path, nest_dir: Path, finetune_dir: Path, name: str, out: Path) -> str:
    """Markdown of a pretrain → nest → finetune trio: every exit's MACs, params and test accuracy."""
    base, nested, tuned = _summary(base_dir), _summary(nest_dir), _summary(finetune_dir)
    prefix = "ema_test_" if "ema_test_top1_1" in tuned["final"] else "test_"
    base_prefix = "ema_test_" if "ema_test_top1_1" in base["final"] else "test_"
    base_macs = base["exits"][0]["macs"]

    def settings(summary: dict) -> str:
        config = TrainConfig.from_dict(summary["train_config"])
        return (f"{config.epochs} epochs, batch {config.batch_size}, lr {config.peak_lr:g}, EMA {config.ema_decay}, "
                f"{summary['steps']} steps, {summary['wall_s'] / 60:.1f} min")  # fmt: skip

    lines = [
        f"# Joint one-pass fine-tuning on real data: {name}",
        "",
        f"Data: {base['data']}. Accuracy on the test split, {'EMA' if prefix.startswith('ema') else 'raw'} weights.",
        "",
        f"- pretrain: {settings(base)}",
        f"- nest: k = {nested['k']}, {nested['mode']}, {nested['select']} → K = {nested['num_subnets']}, "
        f"{nested['nest_s']:.0f} s",
        f"- finetune (all exits, one pass): {settings(tuned)}",
        "",
        "| network | MACs / image | × base MACs | params | top-1 after nest (%) | top-1 after fine-tuning (%) "
        "| top-5 (%) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| base | {base_macs / 1e6:.2f} M | 1.00 | {base['exits'][0]['params'] / 1e6:.3f} M | "
        f"{nested.get('base_test_top1', ['-'])[0]} | {base['final'][f'{base_prefix}top1_1']:.2f} | "
        f"{base['final'][f'{base_prefix}top5_1']:.2f} |",
    ]
    before = nested.get("rdn_test_top1", ["-"] * nested["num_subnets"])
    for exit_, accuracy in zip(tuned["exits"], before, strict=True):
        s = exit_["exit"]
        lines.append(f"| N_{s} | {exit_['macs'] / 1e6:.2f} M | {exit_['macs'] / base_macs:.2f} | "
                     f"{exit_['params'] / 1e6:.3f} M | {accuracy} | {tuned['final'][f'{prefix}top1_{s}']:.2f} | "
                     f"{tuned['final'][f'{prefix}top5_{s}']:.2f} |")  # fmt: skip
    info = machine_info(torch.device("cpu"))
    lines += ["", f"Machine: {info['cpu']} ({info['cpu_cores']} cores), torch {info['torch']}, {info['date']}."]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"training_{name}.md").write_text(text)
    print(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to time")
    parser.add_argument("--width-mult", type=float, default=0.5, help="MobileNetV2 width multiplier")
    parser.add_argument("--k", type=int, default=4, help="channel groups (K = 2k - 1 exits)")
    parser.add_argument("--batch", type=int, default=64, help="images per step")
    parser.add_argument("--mac-budget", type=float, default=1.2, help="row (b): N_K's MACs / the base's at most")
    parser.add_argument("--activation-budget", type=float, default=1.1,
                        help="row (b): N_K's feature-map elements / the base's at most")  # fmt: skip
    parser.add_argument("--copy-fractions", type=float, nargs="+", default=[0.25, 0.5],
                        help="rows (g), one per value: share of each group's channels with copies")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole measurement; the spread is reported")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter samples")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the markdown / CSV results")
    parser.add_argument("--report-runs", type=Path, nargs=3, metavar=("PRETRAIN", "NEST", "FINETUNE"),
                        help="tabulate these rdn run folders instead of timing")  # fmt: skip
    parser.add_argument("--name", default="fashion_mnist", help="with --report-runs: training_<name>.md")
    args = parser.parse_args(argv)
    if args.report_runs:
        report_runs(*args.report_runs, args.name, args.out)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    timing = TIMING_PRESETS["quick" if args.quick else "full"]
    run(torch.device(args.device), args.width_mult, args.k, args.batch, timing, args.out, args.mac_budget,
        args.copy_fractions, args.runs, args.activation_budget)


if __name__ == "__main__":
    main()
