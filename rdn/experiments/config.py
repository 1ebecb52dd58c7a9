"""``ExperimentConfig``: the settings of one ``rdn pipeline`` run, typed, frozen, versioned; its presets.

A run folder's ``settings.json`` is this config's JSON (:meth:`~rdn.config.Config.to_dict`). Files
written before it existed (a plain dict without a version: surgery options, ``dataset`` and
``quick`` at the top level, some keys missing) are read through the version-1 migration. A run
folder is resumed only with an equal config, apart from :data:`RESUMABLE_CHANGES`
(:func:`differences` names what differs, inside the data and surgery configs too).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from rdn.config import Config, ConfigError, config_from_arguments, setting
from rdn.models import list_models
from rdn.steps import DataConfig
from rdn.surgery import NestConfig
from rdn.surgery.config import refuse_unused_budget

__all__ = [
    "ABLATIONS",
    "EPSILON_OFFSETS",
    "OPERATING_OFFSET",
    "TOLERANCE_FACTORS",
    "PRESETS",
    "RESUMABLE_CHANGES",
    "Ablation",
    "ExperimentConfig",
    "differences",
    "from_arguments",
]

# ε is the target error on the calibration split (the paper's λ* rule). By default the list is N_K's
# calibration error plus these offsets; the ε at OPERATING_OFFSET, 0.2 points above N_K's error, is
# the λ* rule's row compared with the operating point (the risk-controlled one of ``tolerance``, run by
# the real early-exit engine) and the one ``rdn infer --from RUN`` deploys.
EPSILON_OFFSETS = (0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
OPERATING_OFFSET = 0.002
# The evaluation also calibrates the policy and the max-softmax rule at these multiples of the run's
# tolerance δ (each its own Learn-then-Test at risk_alpha, on the same calibration split) and compares
# them on the test split: one operating point does not show whether a rule wins at every tolerance.
TOLERANCE_FACTORS = (0.5, 1.0, 2.0, 4.0)

# Settings that do not change what the steps compute (timing, presentation, the optional
# ablations step): a run folder resumes when only these differ.
RESUMABLE_CHANGES = ("preset", "ablations", "bench_batch", "repeats", "time_every_subnet", "bench_device",
                     "bench_threads", "eval_batch_size")  # fmt: skip
_BENCH_DEVICES = (None, "auto", "cpu", "cuda")


@dataclass(frozen=True)
class Ablation:
    """One of the paper's ablations in small: what it changes of the main run (greedy selection,
    pretrained base, every exit in the loss), run as one more fine-tuning beside it."""

    description: str
    select: str
    pretrained: bool
    exits: str


# ``--ablations``: name -> variant (its folder is ablations/NAME/).
ABLATIONS: dict[str, Ablation] = {
    "random_select": Ablation("random instead of greedy channel selection (paper Table 4)", "random", True, "all"),
    "from_scratch": Ablation("a randomly initialised base nested and trained for the base's and the fine-tuning's "
                             "epochs together (paper Table 3)", "greedy", False, "all"),
    "all_but_lightest": Ablation("joint loss on every exit but N_1 (paper Table 5)", "greedy", True,
                                 "all_but_lightest"),
    "largest_only": Ablation("loss on N_K only (paper Table 5)", "greedy", True, "largest"),
}  # fmt: skip


def _from_unversioned_settings(values: dict[str, Any]) -> dict[str, Any]:
    """Version 1, the plain ``settings.json`` dict the pipeline wrote before this config: the surgery
    options and ``dataset`` at the top level, ``quick`` instead of the preset's name, and folders
    older still without the surgery options and ``finetune_lr`` (they ran with these values)."""
    values = {"exact": True, "copy_fraction": 1.0, "mac_budget": None, "compensate": False, "finetune_lr": None,
              "depth_split": None, **values}  # fmt: skip
    nest = {name: values.pop(name) for name in ("k", "exact", "copy_fraction", "mac_budget", "compensate",
                                                "depth_split")}  # fmt: skip
    # The pipeline nested in expand mode with greedy selection and latest copies, seeded by the run's seed.
    nest.update(mode="expand", select="greedy", copies="latest", seed=values.get("seed", 0))
    values["nest"] = nest
    values["data"] = {"dataset": values.pop("dataset")}
    values["preset"] = "quick" if values.pop("quick", False) else "default"
    return values


def _from_single_mlp_policy(values: dict[str, Any]) -> dict[str, Any]:
    """Version 2, before the policy was an ensemble: its runs trained one MLP."""
    return {"policy_members": 1, **values}


@dataclass(frozen=True)
class ExperimentConfig(Config):
    """Everything a pipeline run computes from (``rdn pipeline --help`` shows each field's help).

    Nested configs: ``data`` (:class:`~rdn.steps.DataConfig`) and ``nest``
    (:class:`~rdn.surgery.NestConfig`, whose ``seed`` is always set to the run's ``seed``). Build variants with
    :meth:`replace`, e.g. ``PRESETS["quick"].replace(base_epochs=2)``.
    """

    VERSION: ClassVar[int] = 3
    MIGRATIONS: ClassVar[dict] = {1: _from_unversioned_settings, 2: _from_single_mlp_policy}

    preset: str = setting("default", "the preset the other values started from", choices=("default", "quick"),
                          cli=False)  # fmt: skip
    data: DataConfig = setting(DataConfig(), "the dataset", cli=False)
    # The pipeline's runs nest exactly (N_K is the base model before fine-tuning, ~1.8x its MACs), as its
    # committed results were measured; --no-exact --mac-budget 1.2 runs rdn.nest's default, the budget's search.
    nest: NestConfig = setting(NestConfig(exact=True), "the surgery's options", cli=False)
    model: str = setting("mobilenet_v2", "base architecture (the small-input variant for images <= 64 pixels)",
                         choices=list_models())  # fmt: skip
    width_mult: float = setting(0.25, "channel width multiplier of the base model")
    seed: int = setting(0, "seed of the splits, weight init, data order, surgery and policy", cli=False)
    base_epochs: int = setting(2, "pretraining epochs")
    finetune_epochs: int = setting(2, "joint fine-tuning epochs (every exit, one forward pass)")
    steps_per_epoch: int | None = setting(200, "cap on optimisation steps per epoch; not set: the whole split")
    batch_size: int = setting(128, "training batch size")
    eval_batch_size: int = setting(512, "batch size of the per-epoch evaluation of the monitored test images (added "
                                        "after version 2: earlier settings read with this default)")  # fmt: skip
    lr: float | None = setting(None, "peak learning rate of the pretraining; not set: 0.1 x batch-size / 256")
    finetune_lr: float | None = setting(None, "peak learning rate of the joint fine-tuning; not set: the "
                                              "pretraining's (the paper's scaling is 0.1 x batch-size / 1024)")
    warmup_epochs: float = setting(1.0, "linear learning-rate warm-up of each training, in epochs (at most its "
                                        "epochs)")  # fmt: skip
    bn_momentum: float = setting(0.1, "BatchNorm running-statistics momentum (the paper's 0.01 is for 250k-step "
                                      "runs; rdn/train/config.py)")  # fmt: skip
    monitor_samples: int = setting(2000, "random test images the per-epoch evaluation watches (the report "
                                         "evaluates on the whole test split)")  # fmt: skip
    calib_samples: int = setting(256, "calibration images for the greedy channel selection")
    policy_samples: int = setting(30000, "training samples the exit policy learns from")
    policy_epochs: int = setting(10, "exit policy training epochs")
    policy_hidden: int = setting(16, "width of the policy MLP's hidden layers")
    policy_members: int = setting(3, "MLPs of the policy's ensemble, trained from different initialisations "
                                     "(settings of version 2 read as 1)")  # fmt: skip
    policy_target: str = setting("agreement", "what the exit policy predicts per exit: agreement with N_K's "
                                              "prediction (label-free; its λ path starts at always-N_K, which the "
                                              "risk-controlled operating point needs) or correctness (the paper's)",
                                 choices=("agreement", "correctness"))  # fmt: skip
    all_exits: bool = setting(False, "let the policy exit at every sub-network, not only at those of the nesting "
                                     "order")  # fmt: skip
    epsilons: tuple[float, ...] | None = setting(
        None, "target errors in (0, 1) on the calibration split; not set: N_K's calibration error + "
              f"{', '.join(str(offset) for offset in EPSILON_OFFSETS)}")  # fmt: skip
    tolerance: float = setting(0.005, "the operating point's tolerated fraction of test images whose prediction "
                                      "differs from N_K's (bounds the accuracy drop against N_K), certified with "
                                      "probability 1 - risk-alpha by rdn.calibration on the calibration split; 0: "
                                      "always N_K")  # fmt: skip
    risk_alpha: float = setting(0.1, "the operating point's guarantee holds with probability >= 1 - risk-alpha over "
                                     "the calibration draw")  # fmt: skip
    bench_batch: int = setting(256, "batch of the throughput / memory runs and of the early-exit engine")
    repeats: int = setting(7, "timed rounds (the median is reported)")
    time_every_subnet: bool = setting(True, "time every N_s statically (--no-time-every-subnet: N_1 and N_K)")
    bench_device: str | None = setting(None, "where throughput and memory are measured (auto, cpu or cuda); not "
                                             "set: where the networks are evaluated (--device)")  # fmt: skip
    bench_threads: int | None = setting(None, "torch CPU threads while timing; not set: as for the rest")
    ablations: bool = setting(False, "also run the paper's ablations (random select, from scratch, exit subsets): "
                                     "one more fine-tuning run each, reported beside the main run")  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("base_epochs", "finetune_epochs", "batch_size", "eval_batch_size", "monitor_samples",
                     "calib_samples", "policy_samples", "policy_epochs", "policy_hidden", "policy_members",
                     "bench_batch", "repeats"):  # fmt: skip
            _check_positive_int(name, getattr(self, name))
        for name in ("steps_per_epoch", "bench_threads"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        for name in ("width_mult", "lr", "finetune_lr"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a number > 0, got {value!r}")
        if not (isinstance(self.warmup_epochs, (int, float)) and self.warmup_epochs >= 0):
            raise ConfigError(f"warmup_epochs must be a number >= 0, got {self.warmup_epochs!r}")
        if self.epsilons is not None:
            object.__setattr__(self, "epsilons", tuple(float(e) for e in self.epsilons))
            if not self.epsilons or not all(0 < e < 1 for e in self.epsilons):
                raise ConfigError(f"epsilons must be target errors in (0, 1), got {list(self.epsilons)}")
        from rdn.calibration import check_risk_level

        try:
            check_risk_level(self.tolerance, self.risk_alpha)
        except ValueError as error:
            raise ConfigError(str(error).replace("delta", "tolerance").replace("alpha", "risk_alpha")) from error
        if self.bench_device not in _BENCH_DEVICES:
            raise ConfigError(f"bench_device must be one of {list(_BENCH_DEVICES)}, got {self.bench_device!r}")
        if self.nest.seed != self.seed:  # one seed per run: the surgery's follows it (frozen: set the one way)
            object.__setattr__(self, "nest", self.nest.replace(seed=self.seed))


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")


# --quick checks every step end to end in about a minute on 2 CPU cores (MNIST-5k, one short
# epoch per training). Its training (60 steps of 32 images at learning rate 0.05, no warm-up)
# measured 82 % test top-1 for the base model; 8 steps of 64 images inside the 1-epoch warm-up,
# the earlier preset, ended at chance (10 %). Its policy learns from 3000 training outputs: with 500
# no ε could be calibrated on that RDN (every one fell back to N_K), with 3000 five of seven were.
# bn_momentum 0.1 in both presets: the paper's 0.01 leaves the running statistics far from
# converged after a few hundred steps (chance-level evaluation, measured). policy_samples 30k by
# default: with 5k training outputs the policy fell short of N_K's calibration accuracy at
# lambda -> infinity on a 5 + 5-epoch run; 30k reached it (2 seeds). The quick preset tolerates
# 5 % disagreement with N_K: its calibration split holds 400 images, and certifying δ = 0.005 at
# α = 0.1 needs at least 460 (rdn.calibration.minimum_samples), so the default would always run N_K.
PRESETS: dict[str, ExperimentConfig] = {
    "default": ExperimentConfig(),
    "quick": ExperimentConfig(
        preset="quick", data=DataConfig(dataset="mnist5k"), base_epochs=1, finetune_epochs=1, steps_per_epoch=60,
        batch_size=32, lr=0.05, warmup_epochs=0.0, monitor_samples=256, calib_samples=64, policy_samples=3000,
        policy_epochs=20, repeats=1, time_every_subnet=False, tolerance=0.05,
    ),
}  # fmt: skip


def _values(config: Config) -> dict[str, Any]:
    return {item.name: getattr(config, item.name) for item in fields(config)}


def from_arguments(arguments: argparse.Namespace) -> ExperimentConfig:
    """The config parsed ``rdn pipeline`` options describe: given options over the preset's values
    (``arguments.quick``: the quick preset, else the default), ``arguments.seed`` everywhere."""
    preset = PRESETS["quick" if getattr(arguments, "quick", False) else "default"]
    seed = arguments.seed
    data = config_from_arguments(DataConfig, arguments, defaults=_values(preset.data))
    nest = config_from_arguments(NestConfig, arguments, defaults=_values(preset.nest), seed=seed)
    try:
        given = getattr(arguments, "mac_budget", None), getattr(arguments, "activation_budget", None)
        refuse_unused_budget(given[0], nest, given[1])
    except ValueError as error:
        raise ConfigError(f"{error} (rdn pipeline's presets nest exactly)") from None
    return config_from_arguments(ExperimentConfig, arguments, defaults=_values(preset), data=data, nest=nest,
                                 seed=seed)  # fmt: skip


def differences(saved: Config, current: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """``"field: saved -> current"`` for every differing field, nested configs' fields as ``outer.inner``."""
    changes = []
    for name in saved.differences(current, ignore=ignore):
        before, after = getattr(saved, name), getattr(current, name)
        if isinstance(before, Config) and isinstance(after, Config):
            changes += [f"{name}.{change}" for change in differences(before, after)]
        else:
            changes.append(f"{name}: {before!r} -> {after!r}")
    return changes
