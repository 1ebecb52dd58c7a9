"""``rdn pipeline``: pretrain → nest → fine-tune → order → policy → calibrate → evaluate → report.

    rdn pipeline --dataset fashion-mnist --model mobilenet_v2 --k 4 --out runs/NAME [--quick]

Steps (each writes its output atomically into the run folder and is skipped when it exists, so a
killed run resumes where it stopped; the two training steps also resume mid-run from their
checkpoints):

1. ``base/``: pretrain the base model (:func:`rdn.train.fit`); ``base/result.json`` marks it done.
2. ``nested.pt``: nest it (expand mode, greedy select on calibration images, :func:`rdn.surgery.nest`).
3. ``finetune/``: fine-tune every exit jointly; ``finetune/result.json`` marks it done.
4. ``outputs/{train,calib,test}.pt``: every exit's correctness, softmax statistics and N_1's features
   (:func:`rdn.policy.collect_exit_outputs`, one pass of N_K per batch).
5. ``order.json`` / ``order.png``: the nesting order over the sub-networks' calibration accuracies
   (:mod:`rdn.order`; the width × depth grid: one depth column, or two with ``--depth-split``).
6. ``policy.pt`` / ``calibration.json``: the policy MLP (BCE on a training subset), allowed to exit
   only at the sub-networks of the nesting order (``--all-exits``: at every one), λ* for every ε on
   the calibration split, and the confidence baseline's τ for the same ε (any exit).
7. ``evaluation.json``: on the test split: static N_1..N_K and the base model; the policy and the
   confidence baseline per ε (from the collected per-exit outputs, exact per sample), the real
   early-exit engine (:mod:`rdn.inference`) at the operating point, cross-checked against them;
   wall-clock throughput and peak memory of base, N_s static and dynamic on one batch.
8. ``ablations/NAME/test.json`` (only with ``--ablations``): the paper's ablations in small
   (:data:`ABLATIONS`: random select, from scratch, exit subsets), each nested, fine-tuned (resumable)
   and evaluated on the test split.
9. ``report.md`` / ``tradeoff.png``: the paper's Table 1 and Figure 8 for this run, and the ablations.

ε is the target error on the calibration split: 1 − ε is the accuracy λ* must reach. By default
the list is N_K's calibration error plus :data:`EPSILON_OFFSETS`; the *operating point* is the
ε at offset :data:`OPERATING_OFFSET` (0.2 points below N_K).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from rdn.files import LOCK_NAME, RunFolder, RunFolderError, atomic_write, load_torch_data, write_json

__all__ = ["EPSILON_OFFSETS", "OPERATING_OFFSET", "PRESETS", "add_arguments", "main"]

EPSILON_OFFSETS = (0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
OPERATING_OFFSET = 0.002

# --quick: a smoke run of every step on MNIST-5k; default: Fashion-MNIST sized for ~15 min on 2 CPU cores.
# bn_momentum: the paper's 0.01 leaves BN running statistics far from converged after a few hundred
# steps (evaluation at chance level: measured with the default preset on CPU), so both presets use
# PyTorch's default 0.1; the paper's value is for its 200-epoch runs. policy_samples: with 5k training
# outputs the policy fell short of N_K's calibration accuracy at λ → ∞ on a 5 + 5-epoch run (so ε near
# N_K's error fell back to N_K); 30k reached it (measured, 2 seeds).
PRESETS: dict[str, dict] = {
    "quick": dict(dataset="mnist5k", width_mult=0.25, base_epochs=1, finetune_epochs=1, steps_per_epoch=8,
                  batch_size=64, bn_momentum=0.1, monitor_samples=256, policy_samples=500, policy_epochs=20,
                  policy_hidden=16, calib_samples=64, bench_batch=256, repeats=1, time_every_subnet=False),
    "default": dict(dataset="fashion_mnist", width_mult=0.25, base_epochs=2, finetune_epochs=2,
                    steps_per_epoch=200, batch_size=128, bn_momentum=0.1, monitor_samples=2000, policy_samples=30000,
                    policy_epochs=10, policy_hidden=16,
                    calib_samples=256, bench_batch=256, repeats=7, time_every_subnet=True),
}  # fmt: skip
# --ablations: the paper's ablations in small, each a fine-tuning run beside the main one (which is
# greedy select, pretrained base, every exit in the loss): name → (what it changes, select, pretrained, exits).
ABLATIONS: dict[str, tuple[str, str, bool, str]] = {
    "random_select": ("random instead of greedy channel selection (paper Table 4)", "random", True, "all"),
    "from_scratch": ("a randomly initialised base nested and trained for the base's and the fine-tuning's "
                     "epochs together (paper Table 3)", "greedy", False, "all"),
    "all_but_lightest": ("joint loss on every exit but N_1 (paper Table 5)", "greedy", True, "all_but_lightest"),
    "largest_only": ("loss on N_K only (paper Table 5)", "greedy", True, "largest"),
}
_DATASET_NAMES = {"fashion-mnist": "fashion_mnist", "fashion_mnist": "fashion_mnist", "mnist5k": "mnist5k",
                  "mnist-5k": "mnist5k"}  # fmt: skip
# Settings that change what the steps compute: a run folder is only resumed with the same ones.
_RESULT_SETTINGS = ("dataset", "model", "width_mult", "k", "seed", "base_epochs", "finetune_epochs",
                    "steps_per_epoch", "batch_size", "bn_momentum", "monitor_samples", "policy_samples",
                    "policy_epochs", "policy_hidden", "calib_samples", "all_exits", "depth_split", "exact",
                    "copy_fraction", "mac_budget", "compensate", "finetune_lr")  # fmt: skip

# Settings added after run folders were first written: a folder without them ran with these values.
_SETTINGS_ADDED_LATER = {"exact": True, "copy_fraction": 1.0, "mac_budget": None, "compensate": False,
                         "finetune_lr": None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``rdn pipeline`` (``None`` defaults come from the preset: ``--quick`` or the default)."""
    from rdn.models import list_models

    parser.add_argument("--out", required=True, help="run folder, e.g. runs/NAME (re-running resumes it)")
    parser.add_argument("--dataset", choices=sorted(_DATASET_NAMES), default=None,
                        help="default fashion-mnist (mnist5k with --quick; mnist5k also when Fashion-MNIST is missing)")
    parser.add_argument("--data-root", default=None, help="folder / file of the dataset instead of the default")
    parser.add_argument("--model", choices=list_models(), default="mobilenet_v2", help="base architecture")
    parser.add_argument("--width-mult", type=float, default=None, help="base model width multiplier")
    parser.add_argument("--k", type=int, default=4, help="channel groups per layer (K = 2k - 1 sub-networks)")
    parser.add_argument("--depth-split", type=int, default=None, metavar="BLOCK",
                        help="also nest in depth: a shallow exit per width after model.blocks[BLOCK] (2K exits, "
                             "a K x 2 grid for the nesting order)")  # fmt: skip
    parser.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True,
                        help="surgery keeps every connection (N_K starts as exactly the base model, about 2x its "
                             "MACs); --no-exact: at most two copies of a channel, fewer MACs")  # fmt: skip
    parser.add_argument("--copy-fraction", type=float, default=1.0, metavar="F",
                        help="with --no-exact: share of each group's channels that get copies in the added groups")
    parser.add_argument("--mac-budget", type=float, default=None, metavar="RATIO",
                        help="drop blocks of the added groups until N_K does at most RATIO x the base model's MACs "
                             "(e.g. 1.15 with --no-exact; see rdn.surgery.budget)")  # fmt: skip
    parser.add_argument("--compensate", action="store_true",
                        help="refit the copies that miss inputs (dropped or pruned connections) by least squares on "
                             "the calibration images, layer by layer (rdn.surgery.compensate)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke preset: MNIST-5k, width 0.25, 1 short epoch per training (about 2 minutes)")
    parser.add_argument("--base-epochs", type=int, default=None, help="pretraining epochs")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="joint fine-tuning epochs")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="cap on optimisation steps per epoch")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch size")
    parser.add_argument("--finetune-lr", type=float, default=None, metavar="LR",
                        help="peak learning rate of the joint fine-tuning from the pretrained base (default: the "
                             "pretraining's, 0.1 x batch-size / 256; the paper's scaling is 0.1 x batch-size / 1024)")
    parser.add_argument("--policy-samples", type=int, default=None, help="training samples the policy learns from")
    parser.add_argument("--policy-epochs", type=int, default=None, help="policy training epochs")
    parser.add_argument("--policy-hidden", type=int, default=None, help="width of the policy MLP's hidden layers")
    parser.add_argument("--calib-samples", type=int, default=None, help="images for the greedy channel selection")
    parser.add_argument("--epsilons", type=float, nargs="+", default=None,
                        help="target errors ε in (0, 1) (default: N_K's calibration error + "
                             f"{', '.join(str(o) for o in EPSILON_OFFSETS)})")  # fmt: skip
    parser.add_argument("--bench-batch", type=int, default=None, help="batch of the throughput / memory runs")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (the median is reported)")
    parser.add_argument("--bench-device", choices=("auto", "cpu", "cuda"), default=None,
                        help="where throughput / memory are measured (default: --device)")
    parser.add_argument("--bench-threads", type=int, default=None, help="torch CPU threads while timing")
    parser.add_argument("--ablations", action="store_true",
                        help="also run the paper's ablations (random select, from scratch, exit subsets): one more "
                             "fine-tuning run each, reported beside the main run")  # fmt: skip
    parser.add_argument("--all-exits", action="store_true",
                        help="let the policy exit at every sub-network, not only at those of the nesting order")
    parser.add_argument("--seed", type=int, default=0, help="seed of splits, weights, data order and policy")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA if available")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def _torch_save(path: Path, value) -> Path:
    return atomic_write(path, lambda tmp: torch.save(value, tmp))


class _Steps:
    """Numbered step banners; a step whose outputs all exist is announced as skipped."""

    def __init__(self, total: int) -> None:
        self.total, self.index = total, 0

    def begin(self, title: str, *outputs: Path) -> bool:
        """True when the step must run: some output is missing (or it has none: it always runs)."""
        self.index += 1
        done = bool(outputs) and all(path.exists() for path in outputs)
        state = f"done, skipped ({', '.join(path.name for path in outputs)} exist)" if done else "running"
        print(f"[{self.index}/{self.total}] {title}: {state}", flush=True)
        return not done


# ----------------------------------------------------------------------------------------------
# Settings and data
# ----------------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> dict:
    preset = dict(PRESETS["quick" if args.quick else "default"])
    for key in preset:
        value = getattr(args, key, None)
        if value is not None:
            preset[key] = _DATASET_NAMES[value] if key == "dataset" else value
    preset.update(model=args.model, k=args.k, seed=args.seed, epsilons=args.epsilons, quick=args.quick,
                  all_exits=args.all_exits, ablations=args.ablations, depth_split=args.depth_split,
                  exact=args.exact, copy_fraction=args.copy_fraction, mac_budget=args.mac_budget,
                  compensate=args.compensate, finetune_lr=args.finetune_lr,
                  bench_device=args.bench_device, bench_threads=args.bench_threads)
    return preset


def _load_data(settings: dict, root: str | None):
    from rdn.data import load_dataset

    try:
        return load_dataset(settings["dataset"], root, seed=settings["seed"])
    except FileNotFoundError as error:
        if settings["dataset"] != "fashion_mnist" or root is not None:
            raise
        print(f"Fashion-MNIST is not installed ({error}); falling back to MNIST-5k. Install the Debian package "
              "dataset-fashion-mnist (or pass --data-root) for the default dataset.", flush=True)  # fmt: skip
        settings["dataset"] = "mnist5k"
        return load_dataset("mnist5k", None, seed=settings["seed"])


def _check_resumable(out: Path, settings: dict) -> None:
    path = out / "settings.json"
    if path.is_file():
        saved = _SETTINGS_ADDED_LATER | json.loads(path.read_text())
        changed = [key for key in _RESULT_SETTINGS if saved.get(key) != settings.get(key)]
        if changed:
            details = ", ".join(f"{key}: {saved.get(key)!r} -> {settings.get(key)!r}" for key in changed)
            raise ValueError(f"{out} holds a run with other settings ({details}); use a fresh --out folder")
    write_json(path, settings)


def _batches(dataset, spec, batch_size: int, device: torch.device, limit: int | None = None
             ) -> Iterator[tuple[Tensor, Tensor]]:  # fmt: skip
    """Normalised evaluation batches (x, y) of the first ``limit`` samples of ``dataset``."""
    from rdn.data import BatchTransform, eval_loader

    transform = BatchTransform(spec, train=False)
    if limit is not None and limit < len(dataset):
        dataset = dataset.subset(torch.arange(limit))
    for images, labels, keys in eval_loader(dataset, batch_size):
        yield transform(images.to(device), keys), labels.to(device)


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------


def _train(model: nn.Module, data, settings: dict, epochs: int, folder: Path, model_config: dict, progress: bool,
           exits: str = "all", lr: float | None = None):
    """Train with :func:`rdn.train.fit` (resuming its checkpoint), mark it done with the last epoch's
    accuracy of the EMA weights (what is used from here on) on the monitored test samples, return
    the EMA model.

    The per-epoch evaluation of ``fit`` watches ``monitor_samples`` random test images only
    (it runs twice an epoch, raw and EMA weights); the report evaluates on the whole test split.
    """
    from rdn.data import DataSplits
    from rdn.train import TrainConfig, fit, load_model

    # A seeded random subset: the test split may be ordered by class (MNIST-5k's csv is).
    order = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(settings["seed"]))
    monitored = data.test.subset(order[: settings["monitor_samples"]].sort().values)
    config = TrainConfig(epochs=epochs, batch_size=settings["batch_size"], steps_per_epoch=settings["steps_per_epoch"],
                         bn_momentum=settings["bn_momentum"], seed=settings["seed"], progress=progress,
                         exits=exits, lr=lr)  # fmt: skip
    splits = DataSplits(data.train, data.calib, monitored, data.spec)
    row = fit(model, splits, config, out=folder, model_config=model_config, resume=True).history[-1]
    exits = sum(key.startswith("ema_test_top1_") for key in row)
    write_json(folder / "result.json", {
        "top1": [row[f"ema_test_top1_{s}"] for s in range(1, exits + 1)],
        "top5": [row[f"ema_test_top5_{s}"] for s in range(1, exits + 1)],
        "monitored_test_samples": len(monitored),
    })  # fmt: skip
    return load_model(folder / "checkpoint.pt", use_ema=True)


def _depth_columns(net) -> list[int]:
    return sorted({depth for _, depth in net.exits})


def _exit_grid(net, values: list[float]) -> list[list[float]]:
    """Per-exit values (``net.exits`` order) → the (width, depth) grid of :mod:`rdn.order`: exit
    (s, depth) at row s − 1, in depth column order (one column without a depth split)."""
    columns = _depth_columns(net)
    grid = [[0.0] * len(columns) for _ in range(net.num_groups)]
    for value, (s, depth) in zip(values, net.exits, strict=True):
        grid[s - 1][columns.index(depth)] = value
    return grid


def _cell_exit(net, cell) -> int:
    """The 1-based exit number of grid cell (width index, depth column) of :func:`_exit_grid`."""
    width, column = cell
    return net.exits.index((width + 1, _depth_columns(net)[column])) + 1


def _calibration_images(data, samples: int) -> Tensor:
    x, _ = next(_batches(data.calib, data.spec, samples, torch.device("cpu"), limit=samples))
    return x


def _surgery_summary(settings: dict) -> str:
    text = "exact" if settings["exact"] else "not exact (at most two copies)"
    if settings["copy_fraction"] < 1:
        text += f", copies for {settings['copy_fraction']:g} of each group's channels"
    if settings["mac_budget"] is not None:
        text += f", N_K at most {settings['mac_budget']:g}× the base model's MACs"
    if settings["compensate"]:
        text += ", incomplete copies refitted by least squares"
    return text


def _finetune_lr_summary(settings: dict) -> str:
    lr = settings["finetune_lr"]
    return "" if lr is None else f" at peak learning rate {lr:g}"


def _nest(source: nn.Module, settings: dict, select: str, calib: Tensor, create_kwargs: dict):
    """Expand-mode surgery with the run's settings (k, exactness, copy fraction, MAC budget, depth split)."""
    from rdn.surgery import nest

    return nest(source, k=settings["k"], mode="expand", select=select, calib=calib, seed=settings["seed"],
                exact=settings["exact"], copy_fraction=settings["copy_fraction"], mac_budget=settings["mac_budget"],
                compensate=settings["compensate"], depth_split=settings["depth_split"], base=create_kwargs)  # fmt: skip


def _plot_tradeoff(path: Path, evaluation: dict, title: str) -> None:
    """The paper's Figure 8: static sub-networks, dynamic inference per ε, the confidence baseline."""
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


def _evaluate(net, base, policy, outputs, calibration: dict, data, settings: dict, device, progress: bool) -> dict:
    """Step 7 (module docstring)."""
    from rdn.inference import benchmark, evaluate_dynamic
    from rdn.models.profile import profile_model
    from rdn.policy import confidence_exits, evaluate_exits, exit_macs
    from rdn.train import evaluate

    test = outputs["test"]
    macs = exit_macs(net)
    k = net.num_subnets
    static = [evaluate_exits(torch.full((test.num_samples,), s), test, macs, f"N_{s}") for s in range(1, k + 1)]
    dynamic, confidence = [], []
    for pair in calibration["pairs"]:
        epsilon, lam, tau = pair["epsilon"], pair["lambda"], pair["tau"]
        exits = policy.exits(test.features, test.statistics, lam)
        policy_macs = policy.decision_macs(exits)
        dynamic.append(evaluate_exits(exits, test, macs, "dynamic", epsilon, lam, extra_macs=policy_macs))
        exits = confidence_exits(test.confidence, tau)
        confidence.append(evaluate_exits(exits, test, macs, "confidence", epsilon, tau))
    operating = calibration["operating_epsilon"]
    lam = policy.lambda_for(operating)
    batches = _batches(data.test, data.spec, settings["bench_batch"], device)
    engine = evaluate_dynamic(net, policy, lam, batches, epsilon=operating, progress=progress)
    simulated = next(point for point in dynamic if point.epsilon == operating)
    # The engine's staged path and the one-pass outputs round differently (GPU kernels especially):
    # a sample near a decision boundary may exit elsewhere or flip its prediction. Report how much.
    difference = {"top1_points": 100 * (engine.accuracy - simulated.accuracy), "macs": engine.macs - simulated.macs}

    input_shape = (1, data.spec.in_chans, data.spec.image_size, data.spec.image_size)
    base_profile = profile_model(base, input_shape)
    base_result = evaluate(base, data.test, data.spec, batch_size=settings["bench_batch"])
    base_point = dict(name="base", accuracy=base_result.top1[0] / 100, top5=base_result.top5[0] / 100,
                      macs=float(base_profile.macs), params=base_profile.params)  # fmt: skip

    # Timing may run elsewhere than training (e.g. trained on a GPU, timed on the CPU): on copies.
    bench_device = _device(settings["bench_device"]) if settings["bench_device"] else device
    x, _ = next(_batches(data.test, data.spec, settings["bench_batch"], bench_device, limit=settings["bench_batch"]))
    timed = range(1, k + 1) if settings["time_every_subnet"] else (1, k)
    threads = torch.get_num_threads()
    if settings["bench_threads"]:
        torch.set_num_threads(settings["bench_threads"])
    try:
        measurements = benchmark(copy.deepcopy(net).to(bench_device), copy.deepcopy(policy).to(bench_device), lam, x,
                                 settings["repeats"], timed, copy.deepcopy(base).to(bench_device), progress)
        bench_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    return {
        "static": [asdict(p) for p in static],
        "dynamic": [asdict(p) for p in dynamic],
        "confidence": [asdict(p) for p in confidence],
        "engine": asdict(engine) | {"minus_outputs": difference},
        "base": base_point,
        "params": {"N_K": net.params(k), "policy": sum(p.numel() for p in policy.parameters())},
        "measurements": [asdict(m) | {"name": f"dynamic ε={operating:.4f}"} if m.name == "dynamic" else asdict(m)
                         for m in measurements],
        "device": str(device),
        "bench_device": str(bench_device),
        "threads": bench_threads,
        "cpu": _cpu_name(),
    }


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _mb(value: float) -> str:
    return f"{value / 2**20:.1f}"


def _targets(evaluation: dict) -> list[str]:
    """The project's acceptance checks, computed from this run's numbers."""
    static_k = evaluation["static"][-1]
    engine = evaluation["engine"]
    by_name = {m["name"]: m for m in evaluation["measurements"]}
    dynamic_timing = next(m for m in evaluation["measurements"] if m["name"].startswith("dynamic"))
    static_timing = by_name[f"N_{len(evaluation['static'])} static"]
    speedup = dynamic_timing["images_per_second"] / static_timing["images_per_second"]
    drop = 100 * (static_k["accuracy"] - engine["accuracy"])
    lines = [
        f"- MAC saving of dynamic inference at the operating point: {100 * engine['saving']:.1f} % (target >= 30 %) "
        f"with top-1 {-drop:+.2f} points against static N_K (target: at most 0.2 points lower): "
        f"**{'met' if engine['saving'] >= 0.3 and drop <= 0.2 else 'not met'}**",
        f"- Wall-clock throughput of dynamic vs static N_K (batch {dynamic_timing['batch_size']}): {speedup:.2f}x "
        f"(target >= 1.2x): **{'met' if speedup >= 1.2 else 'not met'}**",
    ]
    # At equal accuracy: the cheapest confidence point (or static N_K) at least as accurate on the test split.
    baseline = evaluation["confidence"] + [static_k]
    comparisons = []
    for point in evaluation["dynamic"]:
        rivals = [c["macs"] for c in baseline if c["accuracy"] >= point["accuracy"]]
        if point["parameter"] is not None and rivals:
            comparisons.append((point, min(rivals)))
    wins = sum(point["macs"] < rival for point, rival in comparisons)
    details = ", ".join(f"{100 * p['accuracy']:.2f} %: {p['macs'] / 1e6:.2f} vs {rival / 1e6:.2f}"
                        for p, rival in comparisons)  # fmt: skip
    lines.append(f"- Dynamic inference vs the cheapest confidence-baseline point at least as accurate (top-1: dynamic "
                 f"vs baseline MMACs): {details}; dynamic cheaper in {wins} of {len(comparisons)}: "
                 f"**{'met' if comparisons and wins == len(comparisons) else 'not met'}**")
    return lines


def _run_ablations(out: Path, base: nn.Module, data, settings: dict, create_kwargs: dict, device, progress: bool
                   ) -> dict:  # fmt: skip
    """Step 8 (``--ablations``): every variant of :data:`ABLATIONS` nested, fine-tuned (resuming its
    checkpoint in ``ablations/NAME/``) and evaluated on the whole test split; ``ablations/NAME/test.json``
    marks it done. Returns name → that json."""
    from rdn.models import create
    from rdn.policy import collect_exit_outputs
    from rdn.train import model_config_of

    calib = _calibration_images(data, settings["calib_samples"])
    results = {}
    for name, (description, select, pretrained, exits) in ABLATIONS.items():
        folder = out / "ablations" / name
        if not (folder / "test.json").exists():
            print(f"  ablation {name}: {description}", flush=True)
            torch.manual_seed(settings["seed"])
            source = copy.deepcopy(base).cpu() if pretrained else create(**create_kwargs)
            net = _nest(source.eval(), settings, select, calib, create_kwargs)
            epochs = settings["finetune_epochs"] + (0 if pretrained else settings["base_epochs"])
            lr = settings["finetune_lr"] if pretrained else None  # from scratch: the pretraining's rate
            net = _train(net, data, settings, epochs, folder, model_config_of(net), progress, exits, lr)
            test = collect_exit_outputs(net.to(device).eval(), _batches(data.test, data.spec, 256, device),
                                        progress=progress)  # fmt: skip
            write_json(folder / "test.json", {
                "description": description, "select": select, "pretrained": pretrained, "exits": exits,
                "epochs": epochs, "top1": test.correct.double().mean(0).tolist(),
                "macs": [float(net.macs(s)) for s in range(1, net.num_subnets + 1)],
            })  # fmt: skip
        results[name] = json.loads((folder / "test.json").read_text())
    return results


def _ablation_lines(settings: dict, evaluation: dict, ablations: dict | None) -> list[str]:
    if not ablations:
        return ["Not run (`rdn pipeline ... --ablations` runs them: random select, from scratch, exit subsets)."]
    static = evaluation["static"]
    k = len(static)
    header = "| Variant | Fine-tuning epochs | " + " | ".join(f"N_{s}" for s in range(1, k + 1)) + " |"
    rows = [
        header,
        "|---|---:|" + "---:|" * k,
        f"| main run: greedy select, pretrained base, every exit in the loss | {settings['finetune_epochs']} | "
        + " | ".join(f"{100 * point['accuracy']:.2f}" for point in static) + " |",
    ]
    for name, result in ablations.items():
        rows.append(f"| {name}: {result['description']} | {result['epochs']} | "
                    + " | ".join(f"{100 * top1:.2f}" for top1 in result["top1"]) + " |")  # fmt: skip
    return [
        "Top-1 (%) of every sub-network on the test split; each variant changes one thing of the main run "
        f"and is trained with its settings (at most {settings['steps_per_epoch']} steps of {settings['batch_size']} "
        "images per epoch).",
        "",
        *rows,
    ]


def _report(out: Path, settings: dict, evaluation: dict, calibration: dict, order: dict, data_summary: str,
            ablations: dict | None = None) -> str:  # fmt: skip
    base, static, engine = evaluation["base"], evaluation["static"], evaluation["engine"]
    k = len(static)
    memory = {m["name"]: m for m in evaluation["measurements"]}
    dynamic_memory = next(m for m in evaluation["measurements"] if m["name"].startswith("dynamic"))
    batch = dynamic_memory["batch_size"]
    lines = [
        f"# RDN pipeline report: {settings['model']} (width {settings['width_mult']}), k = {settings['k']} "
        f"(K = {k}), {settings['dataset']}",
        "",
        f"Data: {data_summary}. Trained and evaluated on {evaluation['device']}; timed on "
        f"{evaluation['bench_device']} ({evaluation['cpu']}, {evaluation['threads']} torch threads). "
        f"Preset: {'quick' if settings['quick'] else 'default'}; base {settings['base_epochs']} epoch(s), fine-tuning "
        f"{settings['finetune_epochs']} epoch(s){_finetune_lr_summary(settings)}, at most "
        f"{settings['steps_per_epoch']} steps of "
        f"{settings['batch_size']} images per epoch. Surgery: expand, greedy, {_surgery_summary(settings)}.",
        "",
        "## Table 1 (form of the paper's Table 1)",
        "",
        f"Memory: measured peak bytes allocated while running one batch of {batch} test images (CPU: torch "
        "profiler allocation events; CUDA: max_memory_allocated). MACs: average per image.",
        "",
        "| Model | Peak mem (MB) | MMACs | Params (M) | Top-1 (%) | Top-5 (%) | Integrated nets |",
        "|---|---:|---:|---:|---:|---:|---|",
        f"| base {settings['model']} | {_mb(memory['base']['peak_bytes'])} | {base['macs'] / 1e6:.2f} | "
        f"{base['params'] / 1e6:.3f} | {100 * base['accuracy']:.2f} | {100 * base['top5']:.2f} | 1 full network |",
        f"| RDN N_K | {_mb(memory[f'N_{k} static']['peak_bytes'])} | {static[-1]['macs'] / 1e6:.2f} | "
        f"{evaluation['params']['N_K'] / 1e6:.3f} | {100 * static[-1]['accuracy']:.2f} | "
        f"{100 * static[-1]['top5']:.2f} | {k} sub-networks |",
        f"| RDN† (dynamic, ε = {engine['epsilon']:.4f}) | {_mb(dynamic_memory['peak_bytes'])} | "
        f"{engine['macs'] / 1e6:.2f} | {(evaluation['params']['N_K'] + evaluation['params']['policy']) / 1e6:.3f} | "
        f"{100 * engine['accuracy']:.2f} | {100 * engine['top5']:.2f} | {k} sub-networks |",
        "",
        "RDN† is measured with the real early-exit engine over the whole test split; minus the same ε computed "
        f"from the per-exit outputs: top-1 {engine['minus_outputs']['top1_points']:+.2f} points, "
        f"{engine['minus_outputs']['macs'] / 1e6:+.3f} MMACs. Its MACs include the policy MLP's "
        f"({evaluation['params']['policy']} parameters).",
        "",
        "## Accuracy–MACs trade-off (form of the paper's Figure 8)",
        "",
        "![trade-off](tradeoff.png)",
        "",
        "Dynamic and confidence rows: each ε calibrated on the calibration split (λ* resp. τ), applied to the test "
        "split; computed from every exit's per-sample test outputs (the engine row above runs its ε for real).",
        "",
        "| Rule | ε | λ* / τ | Top-1 (%) | Top-5 (%) | MMACs | Saving vs N_K | Exit fractions |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for point in static + evaluation["dynamic"] + evaluation["confidence"]:
        epsilon = "" if point["epsilon"] is None else f"{point['epsilon']:.4f}"
        parameter = "N_K (fallback)" if point["epsilon"] is not None and point["parameter"] is None else (
            "" if point["parameter"] is None else f"{point['parameter']:.4g}")  # fmt: skip
        fractions = " ".join(f"{f:.2f}" for f in point["exit_fractions"])
        lines.append(f"| {point['name']} | {epsilon} | {parameter} | {100 * point['accuracy']:.2f} | "
                     f"{100 * point['top5']:.2f} | {point['macs'] / 1e6:.2f} | {100 * point['saving']:.1f} % | "
                     f"{fractions} |")  # fmt: skip
    lines += [
        "",
        f"## Wall clock and memory (batch {batch}, median of {settings['repeats']} interleaved rounds)",
        "",
        "| Run | Images/s | Peak mem (MB) |",
        "|---|---:|---:|",
        *(f"| {m['name']} | {m['images_per_second']:.1f} | {_mb(m['peak_bytes'])} |"
          for m in evaluation["measurements"]),  # fmt: skip
        "",
        "## Targets",
        "",
        *_targets(evaluation),
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
        f"(ε, λ*) pairs (stored in policy.pt and calibration.json); operating point ε = "
        f"{calibration['operating_epsilon']:.4f} (N_K's calibration error + {OPERATING_OFFSET}). The policy may exit "
        f"at {', '.join(f'N_{k}' for k in calibration['exits'])}; the confidence baseline at every exit.",
        "",
        "## Ablations",
        "",
        *_ablation_lines(settings, evaluation, ablations),
    ]
    text = "\n".join(lines) + "\n"
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(text))
    return text


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    return f"unknown CPU ({os.cpu_count()} logical CPUs)"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available")
    return torch.device(name)


def main(args: argparse.Namespace) -> None:
    """Run (or resume) the whole pipeline into ``args.out`` (module docstring).

    The folder is checked and locked before any work (:class:`rdn.files.RunFolder`): one that
    another process is writing, or that holds files of something other than a pipeline run, is
    refused; one holding a pipeline run with other settings is refused too (see ``_check_resumable``).
    """
    with RunFolder(args.out, "pipeline run folder") as folder:
        foreign = sorted(path.name for path in folder.path.iterdir() if path.name != LOCK_NAME)
        if foreign and not (folder.path / "settings.json").is_file():
            raise RunFolderError(
                f"pipeline run folder {folder.path} holds files of something else ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}) and no pipeline settings.json; use a fresh --out folder"
            )
        _run(args)


def _run(args: argparse.Namespace) -> None:
    from rdn.models import create
    from rdn.order import nesting_order, plot_nesting_order
    from rdn.policy import (
        ExitOutputs,
        ExitPolicy,
        calibrate_confidence,
        calibrate_lambda,
        check_epsilon,
        collect_exit_outputs,
        fit_policy,
    )
    from rdn.surgery import RussianDollNet
    from rdn.train import load_model, model_config_of, save_checkpoint

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    progress = not args.no_progress
    settings = _settings(args)
    device = _device(args.device)
    out = Path(args.out)
    data = _load_data(settings, args.data_root)
    _check_resumable(out, settings)
    print(data.summary(), flush=True)
    steps = _Steps(9 if settings["ablations"] else 8)
    create_kwargs = dict(name=settings["model"], num_classes=data.spec.num_classes, input_size=data.spec.image_size,
                         in_chans=data.spec.in_chans, width_mult=settings["width_mult"])  # fmt: skip
    torch.manual_seed(settings["seed"])

    if steps.begin("pretrain the base model", out / "base" / "result.json"):
        base = create(**create_kwargs)
        base = _train(base, data, settings, settings["base_epochs"], out / "base",
                      model_config_of(base, create_kwargs), progress)  # fmt: skip
    else:
        base = load_model(out / "base" / "checkpoint.pt", use_ema=True)

    nested_path = out / "nested.pt"
    if steps.begin(f"nest (expand, greedy select, {_surgery_summary(settings)})", nested_path):
        calib = _calibration_images(data, settings["calib_samples"])
        net = _nest(base, settings, "greedy", calib, create_kwargs)
        save_checkpoint(nested_path, {"model_config": model_config_of(net), "model": net.state_dict()})

    if steps.begin("fine-tune every exit jointly", out / "finetune" / "result.json"):
        net = load_model(nested_path, use_ema=False).train()
        net = _train(net, data, settings, settings["finetune_epochs"], out / "finetune", model_config_of(net), progress,
                     lr=settings["finetune_lr"])
    net = load_model(out / "finetune" / "checkpoint.pt", use_ema=True).to(device).eval()
    base = base.to(device).eval()
    assert isinstance(net, RussianDollNet)

    outputs: dict[str, ExitOutputs] = {}
    splits = ("train", "calib", "test")
    steps.begin("collect every exit's outputs (train subset, calib, test)",
                *(out / "outputs" / f"{split}.pt" for split in splits))  # fmt: skip
    for split, limit in (("train", settings["policy_samples"]), ("calib", None), ("test", None)):
        path = out / "outputs" / f"{split}.pt"
        if not path.exists():
            batches = _batches(getattr(data, split), data.spec, 256, device, limit)
            _torch_save(path, collect_exit_outputs(net, batches, progress=progress).state_dict())
        outputs[split] = ExitOutputs.from_state_dict(load_torch_data(path, what="exit-outputs file")[0])

    calib_accuracy = outputs["calib"].correct.double().mean(0)
    macs = [float(net.macs(s)) for s in range(1, net.num_subnets + 1)]
    if steps.begin("nesting order", out / "order.json"):
        macs_grid, accuracy_grid = _exit_grid(net, macs), _exit_grid(net, calib_accuracy.tolist())
        order = nesting_order(macs_grid, accuracy_grid)
        plot_nesting_order(macs_grid, accuracy_grid, order, out / "order.png",
                           title="Nesting order (calibration accuracy)")  # fmt: skip
        write_json(out / "order.json", {
            "grid": f"{len(macs_grid)}x{len(macs_grid[0])}", "exits": [_cell_exit(net, c) for c in order.path],
            "names": [f"N_{_cell_exit(net, c)}" for c in order.path], "path": order.path, "area": order.area,
            "hull_names": [f"N_{_cell_exit(net, c)}" for c in order.hull], "hull_area": order.hull_area,
            "hull_ratio": order.hull_ratio, "accuracy": calib_accuracy.tolist(), "macs": macs,
        })  # fmt: skip
    order_info = json.loads((out / "order.json").read_text())

    policy_path, calibration_path = out / "policy.pt", out / "calibration.json"
    if steps.begin("train the policy, calibrate λ* and the confidence τ per ε", calibration_path):
        error_k = 1.0 - calib_accuracy[-1].item()
        offsets = EPSILON_OFFSETS if settings["epsilons"] is None else None
        epsilons = [min(max(error_k + o, 1e-4), 0.999) for o in offsets] if offsets else settings["epsilons"]
        epsilons = sorted({round(check_epsilon(e), 6) for e in epsilons})
        operating = min(epsilons, key=lambda e: abs(e - (error_k + OPERATING_OFFSET)))
        torch.manual_seed(settings["seed"])
        policy = ExitPolicy.for_network(net, hidden=settings["policy_hidden"]).to(device)
        if not settings["all_exits"]:  # the nesting order's sub-networks only (paper §3.3)
            policy.restrict_exits([_cell_exit(net, cell) for cell in order_info["path"]])
        fit_policy(policy, outputs["train"], epochs=settings["policy_epochs"], seed=settings["seed"],
                   progress=progress)  # fmt: skip
        lambdas = calibrate_lambda(policy, outputs["calib"], epsilons)
        pairs = [{"epsilon": e, "lambda": lambdas[e], "tau": calibrate_confidence(outputs["calib"], e)}
                 for e in epsilons]  # fmt: skip
        _torch_save(policy_path, policy.state_dict())
        exits = (policy.allowed.nonzero().squeeze(1) + 1).tolist()
        write_json(calibration_path, {"pairs": pairs, "operating_epsilon": operating, "exits": exits,
                                       "policy": json.loads(policy.calibration_json())})  # fmt: skip
    calibration = json.loads(calibration_path.read_text())
    policy = ExitPolicy.for_network(net, hidden=settings["policy_hidden"]).to(device)
    policy.load_state_dict(load_torch_data(policy_path, what="policy file")[0])
    policy.eval()

    evaluation_path = out / "evaluation.json"
    if steps.begin("evaluate static and dynamic inference on the test split", evaluation_path):
        write_json(evaluation_path, _evaluate(net, base, policy, outputs, calibration, data, settings, device,
                                               progress))  # fmt: skip
    evaluation = json.loads(evaluation_path.read_text())

    ablations = None
    if settings["ablations"]:
        steps.begin("ablations (random select, from scratch, exit subsets)",
                    *(out / "ablations" / name / "test.json" for name in ABLATIONS))  # fmt: skip
        ablations = _run_ablations(out, base, data, settings, create_kwargs, device, progress)

    steps.begin("report")
    _plot_tradeoff(out / "tradeoff.png", evaluation, f"{settings['model']} RDN, {settings['dataset']}")
    text = _report(out, settings, evaluation, calibration, order_info, data.summary(), ablations)
    targets = text[text.index("## Targets") : text.index("## Nesting order")].strip()
    print(f"{targets}\nreport: {out / 'report.md'} ({time.perf_counter() - started:.0f} s)", flush=True)

