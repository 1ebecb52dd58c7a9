"""``rdn pipeline``: pretrain → nest → fine-tune → exit outputs → nesting order → policy → evaluate → report.

    rdn pipeline [--quick] [--data fashion_mnist] [--model mobilenet_v2] [--k 4] [--out runs/NAME]

Without ``--out`` the run folder is ``runs/<model>-<data>-k<k>-seed<seed>`` (``-quick`` appended for
the quick preset), printed at the start. The steps (:mod:`rdn.experiments.runner`: each writes its
outputs atomically into the run folder and is skipped when they exist, so a killed run resumes
where it stopped; the two training steps also resume mid-run from their checkpoints):

1. ``base/``: pretrain the base model (:func:`rdn.steps.train`, as ``rdn pretrain``);
   ``base/result.json`` marks it done.
2. ``nested.pt``: nest it (:func:`rdn.steps.nest_model`, as ``rdn nest``, on calibration images).
3. ``finetune/``: fine-tune every exit jointly (as ``rdn finetune``); ``finetune/result.json``.
4. ``outputs/{train,calib,test}.pt``: every exit's correctness, softmax statistics and N_1's features
   (:func:`rdn.policy.collect_exit_outputs`, one pass of N_K per batch).
5. ``order.json`` / ``order.png``: the nesting order over the sub-networks' calibration accuracies
   (:mod:`rdn.order`; the width × depth grid: one depth column, or two with ``--depth-split``).
6. ``policy.pt`` / ``calibration.json``: the policy MLP (BCE on a training subset), allowed to exit
   only at the sub-networks of the nesting order (``--all-exits``: at every one), λ* for every ε on
   the calibration split, and the confidence baseline's τ for the same ε (any exit); the operating
   point: the λ (and τ) that :mod:`rdn.calibration` certifies to disagree with N_K on at most
   ``--tolerance`` of unseen images with probability ≥ 1 − ``--risk-alpha`` (labels unused).
7. ``evaluation.json``: on the test split: static N_1..N_K and the base model; the policy and the
   confidence baseline per ε (from the collected per-exit outputs, exact per sample); the
   risk-controlled operating point, its confidence baseline and the λ* rule at the ε nearest N_K's
   error + 0.2 points against N_K (accuracy drop, saving, disagreement); the real early-exit engine
   (:mod:`rdn.inference`) at the operating point, cross-checked against them;
   wall-clock throughput and peak memory of base, N_s static and dynamic on one batch.
8. ``ablations/NAME/test.json`` (only with ``--ablations``): the paper's ablations in small
   (:data:`~rdn.experiments.config.ABLATIONS`), each nested, fine-tuned (resumable) and evaluated.
9. ``report.md`` / ``tradeoff.png``: rendered from the files above (:mod:`rdn.experiments.report`).

Data: one of the package's in-memory datasets, or an image folder streamed from disk (``--data
imagefolder --data-root PATH``): its training, calibration and evaluation images are decoded batch by
batch in ``--num-workers`` DataLoader workers at every step (:func:`rdn.steps.eval_batches`).

The settings are an :class:`~rdn.experiments.config.ExperimentConfig`, saved as ``settings.json``;
a folder holding a run with other settings is refused, naming them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor, nn

from rdn.errors import DataError, RunMismatchError
from rdn.experiments.config import (
    ABLATIONS,
    EPSILON_OFFSETS,
    OPERATING_OFFSET,
    RESUMABLE_CHANGES,
    TOLERANCE_FACTORS,
    ExperimentConfig,
    differences,
)
from rdn.experiments.report import comparisons, surgery_summary, write_report
from rdn.experiments.runner import Step, run_steps
from rdn.files import LOCK_NAME, RunFolder, RunFolderError, atomic_write, load_torch_data, write_json
from rdn.steps import (
    Data,
    calibration_batch,
    eval_batches,
    evaluate_split,
    load_data,
    nest_model,
    resolve_device,
    train,
)

__all__ = ["cell_exit", "default_folder", "exit_grid", "main", "run"]

SETTINGS_NAME = "settings.json"
SPLITS = ("train", "calib", "test")


def default_folder(config: ExperimentConfig) -> Path:
    """``runs/<model>-<data>-k<k>-seed<seed>``, with ``-<preset>`` for a preset other than the default."""
    name = f"{config.model}-{config.data.dataset}-k{config.nest.k}-seed{config.seed}"
    return Path("runs") / (name if config.preset == "default" else f"{name}-{config.preset}")


def main(args: argparse.Namespace) -> Path:
    """Run (or resume) the pipeline from parsed ``rdn pipeline`` options; returns the run folder."""
    from rdn.experiments.config import from_arguments

    return run(from_arguments(args), out=args.out, data_root=args.data_root, device=args.device,
               progress=args.progress)  # fmt: skip


def run(
    config: ExperimentConfig,
    *,
    out: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Run (or resume) the whole pipeline of ``config`` into ``out``; returns the run folder.

    Args:
        config: the run's settings (:data:`~rdn.experiments.config.PRESETS` or a variant of one).
        out: the run folder; ``None``: :func:`default_folder`.
        data_root: where the dataset's files are (default: its usual place).
        device: ``auto``, ``cpu`` or ``cuda``: where the networks are trained and evaluated.
        progress: progress bars.

    The folder is checked and locked before anything is written (:class:`rdn.files.RunFolder`):
    one another process is writing, or that holds files of something other than a pipeline run,
    is refused; so is one holding a pipeline run with other settings (:class:`RunMismatchError`).
    """
    started = time.perf_counter()
    target = resolve_device(device)
    data, config = _load_data(config, data_root)
    folder = Path(out) if out is not None else default_folder(config)
    if out is None:
        print(f"run folder: {folder} (--out chooses another)", flush=True)
    with RunFolder(folder, "pipeline run folder") as held:
        foreign = sorted(path.name for path in held.path.iterdir() if path.name != LOCK_NAME)
        if foreign and not (folder / SETTINGS_NAME).is_file():
            raise RunFolderError(
                f"pipeline run folder {folder} holds files of something else ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}) and no pipeline {SETTINGS_NAME}; use a fresh --out folder"
            )
        check_resumable(folder, config)
        print(data.summary(), flush=True)
        pipeline = _Pipeline(config, folder, data, target, progress)
        run_steps(folder, pipeline.steps())
    evaluation = json.loads((folder / "evaluation.json").read_text())
    lines = "\n".join(comparisons(evaluation))
    print(f"{lines}\nreport: {folder / 'report.md'} ({time.perf_counter() - started:.0f} s)", flush=True)
    return folder


def _load_data(config: ExperimentConfig, root: str | os.PathLike | None) -> tuple[Data, ExperimentConfig]:
    """The run's data; Fashion-MNIST not installed (and no ``root`` given) falls back to MNIST-5k, said so."""
    try:
        return load_data(config.data, root, config.seed), config
    except DataError as error:
        missing = isinstance(error.__cause__, FileNotFoundError)
        if config.data.dataset != "fashion_mnist" or root is not None or not missing:
            raise  # an explicit root, or a problem other than missing files, is never replaced silently
        print(f"Fashion-MNIST is not installed ({error}); falling back to MNIST-5k. Install the Debian package "
              "dataset-fashion-mnist (or pass --data-root) for the default dataset.", flush=True)  # fmt: skip
        config = config.replace(data=config.data.replace(dataset="mnist5k"))
        return load_data(config.data, None, config.seed), config


def check_resumable(folder: Path, config: ExperimentConfig) -> None:
    """Refuse a folder whose ``settings.json`` holds other settings (:data:`RESUMABLE_CHANGES` aside),
    naming them; then save ``config`` there. Files without a version are read through the migration."""
    path = folder / SETTINGS_NAME
    if path.is_file():
        saved = ExperimentConfig.from_dict(json.loads(path.read_text()))
        changed = differences(saved, config, ignore=RESUMABLE_CHANGES)
        if changed:
            raise RunMismatchError(f"{folder} holds a pipeline run with other settings ({', '.join(changed)}); "
                                   "use a fresh --out folder (or the settings it was run with)")  # fmt: skip
    write_json(path, config.to_dict())


# ----------------------------------------------------------------------------------------------
# Exit grid of the nesting order
# ----------------------------------------------------------------------------------------------


def _depth_columns(net) -> list[int]:
    return sorted({depth for _, depth in net.exits})


def exit_grid(net, values: list[float]) -> list[list[float]]:
    """Per-exit values (``net.exits`` order) → the (width, depth) grid of :mod:`rdn.order`: exit
    (s, depth) at row s − 1, in depth column order (one column without a depth split)."""
    columns = _depth_columns(net)
    grid = [[0.0] * len(columns) for _ in range(net.num_groups)]
    for value, (s, depth) in zip(values, net.exits, strict=True):
        grid[s - 1][columns.index(depth)] = value
    return grid


def cell_exit(net, cell) -> int:
    """The 1-based exit number of grid cell (width index, depth column) of :func:`exit_grid`."""
    width, column = cell
    return net.exits.index((width + 1, _depth_columns(net)[column])) + 1


# ----------------------------------------------------------------------------------------------
# The steps
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_profiler() -> Iterator[None]:
    """Silence the torch profiler's ``USDT: ... profiler_start`` lines on stderr (libkineto logs them
    at its USDT level whenever a profile starts or stops; the CPU peak-memory measurement of
    :mod:`rdn.inference` uses the profiler). Level 6 is above all of kineto's levels; it is read
    when the profiler first starts in the process, and a value the user set is kept."""
    previous = os.environ.get("KINETO_LOG_LEVEL")
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("KINETO_LOG_LEVEL", None)


@contextlib.contextmanager
def _notes(summarised: str = "") -> Iterator[None]:
    """Print a step's warnings as one ``note:`` line each (no source lines, no repeats), except those
    containing ``summarised``, which the step reports itself in one line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    messages = dict.fromkeys(str(warning.message) for warning in caught)
    for message in messages:
        if not (summarised and summarised in message):
            print(f"  note: {message}", flush=True)


class _Pipeline:
    """The steps of one run and what they share: the config, the folder, the data, and the earlier
    steps' outputs, each read from its file the first time a step needs it."""

    def __init__(self, config: ExperimentConfig, folder: Path, data: Data, device: torch.device,
                 progress: bool) -> None:  # fmt: skip
        self.config, self.folder, self.data, self.device, self.progress = config, folder, data, device, progress

    def steps(self) -> list[Step]:
        c = self.config
        steps = [
            Step("pretrain the base model", ("base/result.json",), self.pretrain),
            Step(f"nest ({surgery_summary(c.nest)})", ("nested.pt",), self.nest),
            Step("fine-tune every exit jointly", ("finetune/result.json",), self.finetune),
            Step("collect every exit's outputs (train subset, calib, test)",
                 tuple(f"outputs/{split}.pt" for split in SPLITS), self.collect_outputs),  # fmt: skip
            Step("nesting order", ("order.json", "order.png"), self.nesting_order),
            Step("train the policy, calibrate λ* and the confidence τ per ε", ("policy.pt", "calibration.json"),
                 self.calibrate),  # fmt: skip
            Step("evaluate static and dynamic inference on the test split", ("evaluation.json",), self.evaluate),
        ]
        if c.ablations:
            steps.append(Step("ablations (random select, from scratch, exit subsets)",
                              tuple(f"ablations/{name}/test.json" for name in ABLATIONS), self.ablations))  # fmt: skip
        steps.append(Step("report", (), self.report))
        return steps

    # -- shared pieces ---------------------------------------------------------------------

    @cached_property
    def create_kwargs(self) -> dict:
        spec = self.data.spec
        return dict(name=self.config.model, num_classes=spec.num_classes, input_size=spec.image_size,
                    in_chans=spec.in_chans, width_mult=self.config.width_mult)  # fmt: skip

    @cached_property
    def monitored(self):
        """The seeded random test subset the per-epoch evaluation watches (the test split may be
        ordered by class: MNIST-5k's csv is); an :class:`ImageDataset`, or an ImageFolder of a streamed folder."""
        test = self.data.test
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(self.config.seed))
        return test.subset(order[: self.config.monitor_samples].sort().values)

    def batches(self, dataset, batch_size: int, device: torch.device, limit: int | None = None
                ) -> Iterator[tuple[Tensor, Tensor]]:  # fmt: skip
        """Normalised evaluation batches (x, y) of the first ``limit`` samples of ``dataset`` (a streamed
        folder decodes them from disk batch by batch: :func:`rdn.steps.eval_batches`)."""
        return eval_batches(self.data, dataset, batch_size, device, limit)

    def train(self, model: nn.Module, name: str, epochs: int, model_config: dict, exits: str = "all",
              lr: float | None = None) -> None:  # fmt: skip
        """Train into ``name/`` (resuming its checkpoint) with :func:`rdn.steps.train`, watching the
        monitored test samples, then mark it done: ``name/result.json`` holds the last epoch's
        accuracy of the EMA weights (what the later steps use) on them."""
        from rdn.train import TrainConfig

        c = self.config
        config = TrainConfig(epochs=epochs, batch_size=c.batch_size, lr=lr, warmup_epochs=min(c.warmup_epochs, epochs),
                             steps_per_epoch=c.steps_per_epoch, bn_momentum=c.bn_momentum, seed=c.seed, exits=exits,
                             eval_batch_size=c.eval_batch_size, progress=self.progress)  # fmt: skip
        splits = dataclasses.replace(self.data, test=self.monitored)
        folder = self.folder / name
        result = train(model, splits, config, folder, model_config=model_config, resume=True, device=str(self.device),
                       summary={"command": "pipeline", "step": name})  # fmt: skip
        row = result.history[-1]
        count = sum(key.startswith("ema_test_top1_") for key in row)
        write_json(folder / "result.json", {
            "top1": [row[f"ema_test_top1_{s}"] for s in range(1, count + 1)],
            "top5": [row[f"ema_test_top5_{s}"] for s in range(1, count + 1)],
            "monitored_test_samples": len(self.monitored),
        })  # fmt: skip

    @cached_property
    def base(self) -> nn.Module:
        from rdn.train import load_model

        return load_model(self.folder / "base" / "checkpoint.pt", use_ema=True)

    @cached_property
    def net(self) -> nn.Module:
        from rdn.train import load_model

        return load_model(self.folder / "finetune" / "checkpoint.pt", use_ema=True).to(self.device).eval()

    @cached_property
    def outputs(self) -> dict:
        from rdn.policy import ExitOutputs

        return {split: ExitOutputs.from_state_dict(
            load_torch_data(self.folder / "outputs" / f"{split}.pt", what="exit-outputs file")[0])
            for split in SPLITS}  # fmt: skip

    @cached_property
    def calibration(self) -> dict:
        return json.loads((self.folder / "calibration.json").read_text())

    @cached_property
    def policy(self) -> nn.Module:
        from rdn.policy import ExitPolicy

        policy = ExitPolicy.for_network(self.net, hidden=self.config.policy_hidden, target=self.config.policy_target,
                                        members=self.config.policy_members).to(self.device)  # fmt: skip
        policy.load_state_dict(load_torch_data(self.folder / "policy.pt", what="policy file")[0])
        return policy.eval()

    def _nest(self, base: nn.Module, select: str) -> nn.Module:
        calib = calibration_batch(self.data, self.config.calib_samples)
        return nest_model(base, calib, self.config.nest.replace(select=select), self.create_kwargs)

    # -- steps ---------------------------------------------------------------------------------

    def pretrain(self) -> None:
        from rdn.models import create
        from rdn.train import model_config_of

        torch.manual_seed(self.config.seed)
        model = create(**self.create_kwargs)
        self.train(model, "base", self.config.base_epochs, model_config_of(model, self.create_kwargs),
                   lr=self.config.lr)  # fmt: skip

    def nest(self) -> None:
        from rdn.train import model_config_of, save_checkpoint

        net = self._nest(self.base, self.config.nest.select)
        save_checkpoint(self.folder / "nested.pt", {"model_config": model_config_of(net), "model": net.state_dict()})

    def finetune(self) -> None:
        from rdn.train import load_model, model_config_of

        net = load_model(self.folder / "nested.pt", use_ema=False).train()
        self.train(net, "finetune", self.config.finetune_epochs, model_config_of(net), lr=self._finetune_lr)

    @property
    def _finetune_lr(self) -> float | None:
        return self.config.lr if self.config.finetune_lr is None else self.config.finetune_lr

    def collect_outputs(self) -> None:
        from rdn.policy import collect_exit_outputs

        for split, limit in (("train", self.config.policy_samples), ("calib", None), ("test", None)):
            path = self.folder / "outputs" / f"{split}.pt"
            if not path.exists():
                batches = self.batches(getattr(self.data, split), 256, self.device, limit)
                outputs = collect_exit_outputs(self.net, batches, progress=self.progress).state_dict()
                atomic_write(path, lambda tmp, outputs=outputs: torch.save(outputs, tmp))

    def nesting_order(self) -> None:
        from rdn.order import nesting_order, plot_nesting_order

        net = self.net
        accuracy = self.outputs["calib"].correct.double().mean(0).tolist()
        macs = [float(net.macs(s)) for s in range(1, net.num_subnets + 1)]
        macs_grid, accuracy_grid = exit_grid(net, macs), exit_grid(net, accuracy)
        order = nesting_order(macs_grid, accuracy_grid)
        plot_nesting_order(macs_grid, accuracy_grid, order, self.folder / "order.png",
                           title="Nesting order (calibration accuracy)")  # fmt: skip
        write_json(self.folder / "order.json", {
            "grid": f"{len(macs_grid)}x{len(macs_grid[0])}", "exits": [cell_exit(net, c) for c in order.path],
            "names": [f"N_{cell_exit(net, c)}" for c in order.path], "path": order.path, "area": order.area,
            "hull_names": [f"N_{cell_exit(net, c)}" for c in order.hull], "hull_area": order.hull_area,
            "hull_ratio": order.hull_ratio, "accuracy": accuracy, "macs": macs,
        })  # fmt: skip

    def _epsilons(self) -> tuple[list[float], float]:
        """(every ε, the operating ε): N_K's calibration error + :data:`EPSILON_OFFSETS` unless given."""
        from rdn.policy import check_epsilon

        error_k = 1.0 - self.outputs["calib"].correct.double().mean(0)[-1].item()
        if self.config.epsilons is None:
            epsilons = [min(max(error_k + offset, 1e-4), 0.999) for offset in EPSILON_OFFSETS]
        else:
            epsilons = list(self.config.epsilons)
        epsilons = sorted({round(check_epsilon(e), 6) for e in epsilons})
        return epsilons, min(epsilons, key=lambda e: abs(e - (error_k + OPERATING_OFFSET)))

    def calibrate(self) -> None:
        from rdn.policy import ExitPolicy, calibrate_confidence, calibrate_lambda, fit_policy

        net, c = self.net, self.config
        epsilons, operating = self._epsilons()
        torch.manual_seed(c.seed)
        policy = ExitPolicy.for_network(net, hidden=c.policy_hidden, target=c.policy_target,
                                        members=c.policy_members).to(self.device)  # fmt: skip
        if not c.all_exits:  # the nesting order's sub-networks only (paper §3.3)
            order = json.loads((self.folder / "order.json").read_text())
            policy.restrict_exits([cell_exit(net, cell) for cell in order["path"]])
        fit_policy(policy, self.outputs["train"], epochs=c.policy_epochs, seed=c.seed, progress=self.progress)
        # An ε the rule cannot reach falls back to N_K (λ* / τ = None): one warning per ε and rule,
        # said here in one line per rule instead (the report marks those rows).
        with _notes(summarised="falling back to always exiting at N_K"):
            lambdas = calibrate_lambda(policy, self.outputs["calib"], epsilons)
            pairs = [{"epsilon": e, "lambda": lambdas[e], "tau": calibrate_confidence(self.outputs["calib"], e)}
                     for e in epsilons]  # fmt: skip
        for rule, key in (("the policy", "lambda"), ("the confidence baseline", "tau")):
            missed = [f"{pair['epsilon']:g}" for pair in pairs if pair[key] is None]
            if missed:
                print(f"  note: at ε = {', '.join(missed)} no setting of {rule} reaches accuracy 1 - ε on the "
                      "calibration split; it falls back to N_K there", flush=True)  # fmt: skip
        controlled = self._risk_control(policy)
        state = policy.state_dict()
        atomic_write(self.folder / "policy.pt", lambda tmp: torch.save(state, tmp))
        exits = (policy.allowed.nonzero().squeeze(1) + 1).tolist()
        write_json(self.folder / "calibration.json", {"pairs": pairs, "operating_epsilon": operating, "exits": exits,
                                                      "policy": json.loads(policy.calibration_json()),
                                                      "risk_control": controlled})  # fmt: skip

    def _risk_control(self, policy: nn.Module) -> dict:
        """The operating point: λ (and the confidence baseline's τ, calibrated the same way) certified
        by :mod:`rdn.calibration` to disagree with N_K on at most ``tolerance`` of unseen images, with
        probability ≥ 1 − ``risk_alpha``. Calibrated on the calibration split, labels unused: it is
        exchangeable with the test split and neither the network nor the policy trained on it (the
        training split is not valid: the network fits it, the policy learned from its outputs)."""
        from rdn.calibration import minimum_samples

        calib, c = self.outputs["calib"], self.config
        if calib.predictions is None:
            raise DataError(f"{self.folder / 'outputs'} was collected by an older rdn (no per-exit predictions, which "
                            "the risk-controlled calibration needs): delete that folder and run again")  # fmt: skip
        needed = minimum_samples(c.tolerance, c.risk_alpha)
        if c.tolerance > 0 and calib.num_samples < needed:
            print(f"  note: certifying tolerance {c.tolerance:g} at risk-alpha {c.risk_alpha:g} needs at least "
                  f"{needed} calibration images, the split holds {calib.num_samples}: the operating point runs N_K",
                  flush=True)  # fmt: skip
        return {rule: control.to_dict() for rule, control in self._certify(policy, c.tolerance).items()}

    def _certify(self, policy: nn.Module, delta: float) -> dict:
        """``{"policy": ..., "confidence": ...}``: the :class:`~rdn.calibration.RiskControl` of λ and of
        the max-softmax τ, each certified at tolerance ``delta`` on the calibration split."""
        from rdn.calibration import calibrate_confidence_consistency, calibrate_consistency
        from rdn.policy import exit_macs, exit_savings

        calib, alpha = self.outputs["calib"], self.config.risk_alpha
        return {
            "policy": calibrate_consistency(policy, calib, delta, alpha, macs=exit_macs(self.net)),
            "confidence": calibrate_confidence_consistency(calib, delta, alpha, savings=exit_savings(self.net)),
        }

    def evaluate(self) -> None:
        write_json(self.folder / "evaluation.json", self._evaluation())

    def _evaluation(self) -> dict:
        """Step 7 (module docstring)."""
        from rdn.inference import STRATEGIES, benchmark, evaluate_dynamic
        from rdn.models.profile import profile_model
        from rdn.policy import confidence_exits, evaluate_exits, exit_macs
        from rdn_kernels.timing import cpu_name

        net, policy, c, data, device = self.net, self.policy, self.config, self.data, self.device
        base = self.base.to(device).eval()
        test = self.outputs["test"]
        macs = exit_macs(net)
        k = net.num_subnets
        static = [evaluate_exits(torch.full((test.num_samples,), s), test, macs, f"N_{s}") for s in range(1, k + 1)]
        dynamic, confidence = [], []
        for pair in self.calibration["pairs"]:
            epsilon, lam, tau = pair["epsilon"], pair["lambda"], pair["tau"]
            exits = policy.exits(test.features, test.statistics, lam)
            dynamic.append(evaluate_exits(exits, test, macs, "dynamic", epsilon, lam,
                                          extra_macs=policy.rule_macs(exits, lam)))  # fmt: skip
            confidence.append(evaluate_exits(confidence_exits(test.confidence, tau), test, macs, "confidence", epsilon,
                                             tau))  # fmt: skip
        controlled = self.calibration["risk_control"]
        lam, tau = controlled["policy"]["parameter"], controlled["confidence"]["parameter"]
        exits = policy.exits(test.features, test.statistics, lam)
        simulated = evaluate_exits(exits, test, macs, "dynamic", None, lam, extra_macs=policy.rule_macs(exits, lam))
        confidence_exits_test = confidence_exits(test.confidence, tau)
        risk_control = {
            rule: controlled[rule] | {"test": _against_n_k(point, static[-1], test, chosen)}
            for rule, point, chosen in (
                ("policy", simulated, exits),
                ("confidence", evaluate_exits(confidence_exits_test, test, macs, "confidence", None, tau),
                 confidence_exits_test),
            )
        }  # fmt: skip
        # The paper's λ* rule at the operating ε, compared on the same terms.
        operating = self.calibration["operating_epsilon"]
        star = policy.exits(test.features, test.statistics, policy.lambda_for(operating))
        star_point = next(point for point in dynamic if point.epsilon == operating)
        risk_control["lambda_star"] = {"epsilon": operating, "parameter": policy.lambda_for(operating),
                                       "test": _against_n_k(star_point, static[-1], test, star)}  # fmt: skip
        tolerances = self._tolerance_sweep(static[-1]) if c.tolerance > 0 else []
        batches = self.batches(data.test, c.bench_batch, device)
        engine = evaluate_dynamic(net, policy, lam, batches, progress=self.progress)
        # The engine's staged path and the one-pass outputs round differently (GPU kernels especially):
        # a sample near a decision boundary may exit elsewhere or flip its prediction. Report how much.
        difference = {"top1_points": 100 * (engine.accuracy - simulated.accuracy), "macs": engine.macs - simulated.macs}

        input_shape = (1, data.spec.in_chans, data.spec.image_size, data.spec.image_size)
        base_profile = profile_model(base, input_shape)
        base_result = evaluate_split(base, data, data.test, batch_size=c.bench_batch)
        base_point = dict(name="base", accuracy=base_result.top1[0] / 100, top5=base_result.top5[0] / 100,
                          macs=float(base_profile.macs), params=base_profile.params)  # fmt: skip

        # Timing may run elsewhere than training (e.g. trained on a GPU, timed on the CPU): on copies.
        bench_device = resolve_device(c.bench_device) if c.bench_device else device
        x, _ = next(self.batches(data.test, c.bench_batch, bench_device, limit=c.bench_batch))
        timed = range(1, k + 1) if c.time_every_subnet else (1, k)
        threads = torch.get_num_threads()
        if c.bench_threads:
            torch.set_num_threads(c.bench_threads)
        try:
            with _quiet_profiler():
                measurements = benchmark(copy.deepcopy(net).to(bench_device), copy.deepcopy(policy).to(bench_device),
                                         lam, x, c.repeats, timed, copy.deepcopy(base).to(bench_device),
                                         self.progress, STRATEGIES)  # fmt: skip
            bench_threads = torch.get_num_threads()
        finally:
            torch.set_num_threads(threads)
        return {
            "data": data.summary(),
            "static": [asdict(p) for p in static],
            "dynamic": [asdict(p) for p in dynamic],
            "confidence": [asdict(p) for p in confidence],
            "engine": asdict(engine) | {"minus_outputs": difference},
            "risk_control": risk_control,
            "tolerances": tolerances,
            "base": base_point,
            "params": {"N_K": net.params(k), "policy": sum(p.numel() for p in policy.parameters())},
            "measurements": [asdict(m) | {"name": f"{m.name} δ={c.tolerance:g}"} if m.name.startswith("dynamic")
                             else asdict(m) for m in measurements],  # fmt: skip
            "device": str(device),
            "bench_device": str(bench_device),
            "threads": bench_threads,
            "cpu": f"{cpu_name()} ({os.cpu_count()} logical CPUs)",
        }

    def _tolerance_sweep(self, static_k) -> list[dict]:
        """The policy and the max-softmax rule certified at every multiple of ``tolerance`` in
        TOLERANCE_FACTORS (each its own Learn-then-Test on the calibration split, as the operating
        point), and what each achieved on the test split."""
        from rdn.policy import confidence_exits, evaluate_exits, exit_macs

        policy, c = self.policy, self.config
        test, macs = self.outputs["test"], exit_macs(self.net)
        rows = []
        for delta in sorted({c.tolerance * factor for factor in TOLERANCE_FACTORS if c.tolerance * factor < 1}):
            certified = self._certify(policy, delta)
            lam, tau = certified["policy"].parameter, certified["confidence"].parameter
            chosen = policy.exits(test.features, test.statistics, lam)
            point = evaluate_exits(chosen, test, macs, "dynamic", None, lam, extra_macs=policy.rule_macs(chosen, lam))
            confident = confidence_exits(test.confidence, tau)
            baseline = evaluate_exits(confident, test, macs, "confidence", None, tau)
            rows.append({"delta": delta, "alpha": c.risk_alpha,
                         "policy": {"parameter": lam} | _against_n_k(point, static_k, test, chosen),
                         "confidence": {"parameter": tau} | _against_n_k(baseline, static_k, test, confident)})
        return rows

    def ablations(self) -> None:
        """Step 8 (``--ablations``): every variant nested, fine-tuned (resuming its checkpoint in
        ``ablations/NAME/``) and evaluated on the whole test split; ``ablations/NAME/test.json``."""
        from rdn.models import create
        from rdn.policy import collect_exit_outputs
        from rdn.train import load_model, model_config_of

        c = self.config
        for name, ablation in ABLATIONS.items():
            folder = self.folder / "ablations" / name
            if (folder / "test.json").exists():
                continue
            print(f"  ablation {name}: {ablation.description}", flush=True)
            torch.manual_seed(c.seed)
            source = copy.deepcopy(self.base).cpu() if ablation.pretrained else create(**self.create_kwargs)
            net = self._nest(source.eval(), ablation.select)
            epochs = c.finetune_epochs + (0 if ablation.pretrained else c.base_epochs)
            lr = self._finetune_lr if ablation.pretrained else c.lr  # from scratch: the pretraining's rate
            self.train(net, f"ablations/{name}", epochs, model_config_of(net), ablation.exits, lr)
            trained = load_model(folder / "checkpoint.pt", use_ema=True).to(self.device).eval()
            test = collect_exit_outputs(trained, self.batches(self.data.test, 256, self.device), progress=self.progress)
            write_json(folder / "test.json", {
                "description": ablation.description, "select": ablation.select, "pretrained": ablation.pretrained,
                "exits": ablation.exits, "epochs": epochs, "top1": test.correct.double().mean(0).tolist(),
                "macs": [float(trained.macs(s)) for s in range(1, trained.num_subnets + 1)],
            })  # fmt: skip

    def report(self) -> None:
        write_report(self.folder)


def _against_n_k(point, static_k, outputs, exits: Tensor) -> dict:
    """What a rule achieved on the test split against static N_K: its accuracy drop (points), MAC
    saving and disagreement rate with N_K's predictions (the risk the calibration controls)."""
    from rdn.calibration import consistency_losses

    return {"accuracy_drop_points": 100 * (static_k.accuracy - point.accuracy), "saving": point.saving,
            "disagreement": consistency_losses(outputs, exits).double().mean().item(), "accuracy": point.accuracy,
            "macs": point.macs}  # fmt: skip
