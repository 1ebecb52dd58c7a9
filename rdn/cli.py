"""Command line: ``rdn pretrain | nest | finetune | pipeline | calibrate | infer | export`` (``python -m rdn``).

A typical run (Fashion-MNIST, small MobileNetV2, a few CPU minutes per epoch)::

    rdn pretrain --model mobilenet_v2 --width-mult 0.35 --epochs 5 --out runs/base
    rdn nest --from runs/base --k 4 --mode expand --select greedy --out runs/rdn
    rdn finetune --from runs/rdn --epochs 3 --out runs/rdn-ft
    rdn infer images/ --from runs/rdn-ft --subnet 3 --out predictions.csv
    rdn export --from runs/rdn-ft --subnet 3 --out exported/

or everything at once, with an early-exit policy and a report: ``rdn pipeline [--quick]``.
Your own images: ``--data imagefolder --data-root PATH`` (``PATH/train/<class>/*.jpg`` and
``PATH/val/<class>/*.jpg``, ImageNet's layout) with ``--image-size`` and ``--num-workers``, on every
command above: streamed from disk (:mod:`rdn.data.folder`), never loaded whole.

Options are generated from the typed configs (:mod:`rdn.config`): training options from
:class:`rdn.train.TrainConfig`, surgery options from :class:`rdn.surgery.NestConfig`, data options
from :class:`rdn.steps.DataConfig`, the pipeline's own from
:class:`rdn.experiments.config.ExperimentConfig`; their help shows the real defaults. The same
thing has the same name in every command (``--data``, ``--seed``, ``--out``, ...). The commands
call :mod:`rdn.steps` (shared with the pipeline) and :mod:`rdn.deploy`; this module only parses.

Multi-GPU / multi-node: launch the same command with ``torchrun --nproc-per-node N -m rdn ...``.
Every training command writes into its run folder (``--out``): ``checkpoint.pt``, ``log.csv``,
``log.json``, ``accuracy.png`` and ``summary.json``; ``--resume`` continues a killed run exactly.
The folder is checked and locked before any work starts: a folder holding another run is refused
unless ``--resume`` (continue it) or ``--overwrite`` (replace it) is given, and a folder another
process is writing is refused.
Paper ablations: ``finetune --exits largest | all_but_lightest`` (Table 5), ``nest --select random``
(Table 4), and from-scratch training (Table 3) by nesting a randomly initialised base model
(``nest --model NAME`` without ``--from``).

Exit status: 0 done; 2 a user error (:mod:`rdn.errors`: the message says what to change; set
``RDN_TRACEBACK=1`` to see where it was raised); 3 training stopped on a non-finite loss; anything
else is a bug and prints its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rdn.errors import CliError

__all__ = ["CliError", "build_parser", "main"]



class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to hand-written options' help, except where it would say nothing (a None
    default, an off switch) or the help already states it (the options generated from configs do)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


_FORMATTER = _Formatter
QUICK_STEPS = 10
# What --quick changes for pretrain / nest / finetune (the pipeline has its own preset).
_QUICK = {"dataset": "mnist5k", "epochs": 1, "steps_per_epoch": QUICK_STEPS}
# TrainConfig fields that only mean something for an RDN (several exits).
_RDN_TRAINING = ("exits", "exit_weights", "distill", "distill_temperature")
# Dataset names as the pipeline's --dataset spelled them (still accepted by that deprecated alias).
_OLD_DATASET_NAMES = {"fashion-mnist": "fashion_mnist", "mnist-5k": "mnist5k"}


class _DeprecatedAlias(argparse.Action):
    """An old option name: stores into the new option's destination, warns on stderr, hidden from help."""

    def __init__(self, option_strings, dest, replacement: str, convert=str, **kwargs) -> None:
        # default SUPPRESS: an alias never given must not set its destination (the new option's default stays).
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)
        self.replacement, self.convert = replacement, convert

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"rdn: {option_string} is deprecated, use {self.replacement}", file=sys.stderr)
        try:
            setattr(namespace, self.dest, self.convert(values))
        except ValueError as error:
            parser.error(f"argument {option_string}: {error}")


def _dataset_name(value: str) -> str:
    from rdn.data import DATASETS

    name = _OLD_DATASET_NAMES.get(value, value)
    if name not in DATASETS:
        raise ValueError(f"invalid choice: {value!r} (choose from {', '.join(DATASETS)})")
    return name


def _datasets() -> tuple[str, ...]:
    from rdn.data import DATASETS

    return DATASETS


def _mark_preset(parser: argparse.ArgumentParser, values: dict[str, Any], preset: str = "--quick") -> None:
    """Append "; --quick: VALUE" to the "(default: ...)" of the options whose value the preset changes."""
    for action in parser._actions:
        if action.dest in values and action.help and action.help.endswith(")"):
            value = values[action.dest]
            shown = "not set" if value is None else (list(value) if isinstance(value, tuple) else value)
            action.help = f"{action.help[:-1]}; {preset}: {shown})"


def _add_run_options(parser: argparse.ArgumentParser, *, out_help: str = "run folder (created), e.g. runs/NAME",
                     out_required: bool = True, resume: bool = False, overwrite: bool = True, quick: str | None = None,
                     progress: bool = False) -> None:  # fmt: skip
    """Where and how a command runs: --out, --overwrite, --resume, --device, --threads, --quick, --progress."""
    group = parser.add_argument_group("run")
    group.add_argument("--out", required=out_required, default=None, help=out_help)
    if overwrite:
        group.add_argument("--overwrite", action="store_true",
                           help="replace the run already in --out (its checkpoint and logs are deleted first); "
                                "without it a folder holding a run is refused")  # fmt: skip
    if resume:
        group.add_argument("--resume", action="store_true",
                           help="continue the run in --out from its checkpoint.pt (exactly where it stopped)")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto: this process's GPU when CUDA is available, else the CPU")
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    if quick is not None:
        group.add_argument("--quick", action="store_true", help=quick)
    if progress:
        group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")


def _append_help(parser: argparse.ArgumentParser, dest: str, text: str) -> None:
    """Add ``text`` to the help of option ``dest``, before its "(default: ...)"."""
    action = next(action for action in parser._actions if action.dest == dest)
    action.help = action.help.replace(" (default", f"{text} (default", 1)


def _add_data_options(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None,
                      training: bool = False) -> None:  # fmt: skip
    """--data, --calib-size, --image-size, --num-workers (:class:`rdn.steps.DataConfig`), --data-root, --seed.

    ``training``: the command also has the training options, whose ``--num-workers``
    (``TrainConfig.num_workers``) is the data's too: it is declared there, with the data's help added.
    """
    from rdn.config import add_config_arguments
    from rdn.steps import WORKERS_HELP, DataConfig

    group = parser.add_argument_group("data")
    add_config_arguments(group, DataConfig, defaults=defaults, exclude=("num_workers",) if training else ())
    if not training:
        _append_help(parser, "num_workers", WORKERS_HELP)
    group.add_argument("--dataset", dest="dataset", action=_DeprecatedAlias, replacement="--data",
                       convert=_dataset_name)  # fmt: skip
    group.add_argument("--data-root", default=None,
                       help="folder (or file) holding the dataset's files instead of the default location")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of everything: splits, weight init, data order, augmentation, dropout, surgery")


def _add_training_options(parser: argparse.ArgumentParser, rdn: bool) -> None:
    """Every :class:`rdn.train.TrainConfig` option (the RDN-only ones for ``rdn``), seed aside (--seed)."""
    from rdn.config import add_config_arguments
    from rdn.steps import WORKERS_HELP
    from rdn.train import TrainConfig

    group = parser.add_argument_group("training (paper §4.1 recipe scaled down; see rdn/train/config.py)")
    add_config_arguments(group, TrainConfig, exclude=("seed",) if rdn else ("seed", *_RDN_TRAINING))
    _append_help(parser, "ema_decay", "; on the command line, 0 is not set")
    _append_help(parser, "num_workers", WORKERS_HELP)
    group.add_argument("--workers", dest="num_workers", action=_DeprecatedAlias, replacement="--num-workers",
                       convert=int)  # fmt: skip


def _add_model_options(parser: argparse.ArgumentParser, required: bool) -> None:
    from rdn.models import list_models

    group = parser.add_argument_group("model")
    group.add_argument("--model", choices=list_models(), required=required, default=None,
                       help="base architecture (the small-input variant for images <= 64 pixels)")
    group.add_argument("--width-mult", type=float, default=1.0, help="channel width multiplier of the base model")


def _add_pipeline_options(parser: argparse.ArgumentParser) -> None:
    """``rdn pipeline``'s options: run, data, surgery (NestConfig) and the experiment's own
    (ExperimentConfig), defaults from the default preset, the quick preset's differences marked."""
    from rdn.config import add_config_arguments
    from rdn.experiments.config import PRESETS, ExperimentConfig
    from rdn.surgery import NestConfig

    default, quick = PRESETS["default"], PRESETS["quick"]
    _add_run_options(parser, out_required=False, overwrite=False, progress=True,
                     out_help="run folder, e.g. runs/NAME; re-running resumes it (default: "
                              "runs/<model>-<data>-k<k>-seed<seed>, -quick appended with --quick)",
                     quick="smoke preset: every step on MNIST-5k in about a minute; it checks plumbing, its "
                           "numbers do not measure the method")  # fmt: skip
    _add_data_options(parser, defaults=_values(default.data))
    surgery = parser.add_argument_group("surgery (rdn.surgery.NestConfig)")
    add_config_arguments(surgery, NestConfig, exclude=("seed",), defaults=_values(default.nest))
    experiment = parser.add_argument_group("experiment (rdn.experiments.config.ExperimentConfig; defaults of the "
                                           "default preset)")  # fmt: skip
    add_config_arguments(experiment, ExperimentConfig, exclude=("seed",), defaults=_values(default))
    changed = {name: value for config, preset in ((default, quick), (default.data, quick.data),
                                                  (default.nest, quick.nest))
               for name, value in _values(preset).items()
               if not dataclasses.is_dataclass(value) and value != getattr(config, name)}  # fmt: skip
    _mark_preset(parser, changed)


def _values(config) -> dict[str, Any]:
    return {item.name: getattr(config, item.name) for item in dataclasses.fields(config)}


def build_parser(with_pipeline: bool = True) -> argparse.ArgumentParser:
    """The ``rdn`` parser. ``with_pipeline`` is accepted for older callers; every command is always there."""
    del with_pipeline
    from rdn.config import add_config_arguments
    from rdn.surgery import NestConfig

    parser = argparse.ArgumentParser(
        prog="rdn", description="Russian doll networks: pretrain a base model, nest it into an RDN, fine-tune "
        "all its sub-networks jointly, run it with early exits, export its sub-networks.", formatter_class=_FORMATTER,
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    quick = f"smoke run: 1 epoch of at most {QUICK_STEPS} steps on mnist5k (unless given otherwise)"

    pretrain = commands.add_parser("pretrain", formatter_class=_FORMATTER, help="train a base model",
                                   description="Train a base model (the RDN's pretrained super-net) from scratch.")
    _add_run_options(pretrain, resume=True, quick=quick)
    _add_model_options(pretrain, required=True)
    _add_data_options(pretrain, training=True)
    _add_training_options(pretrain, rdn=False)
    _mark_preset(pretrain, _QUICK)

    nest = commands.add_parser(
        "nest", formatter_class=_FORMATTER, help="turn a pretrained base model into an RDN",
        description="Surgery (docs/): nest a pretrained base model (--from a pretrain run) into K sub-networks; "
        "without --from, a randomly initialised --model is nested (the paper's from-scratch ablation). Writes "
        "checkpoint.pt (weights + rdn_config) and summary.json (MACs, params and test accuracy of every N_s).",
    )  # fmt: skip
    _add_run_options(nest, quick="mnist5k unless --data is given")
    nest.add_argument("--from", dest="source", default=None, help="pretrain run folder or its checkpoint.pt")
    _add_model_options(nest, required=False)
    surgery = nest.add_argument_group("surgery (rdn.surgery.NestConfig)")
    add_config_arguments(surgery, NestConfig, exclude=("seed",))
    surgery.add_argument("--calib-samples", type=int, default=256,
                         help="calibration images of the greedy selection, MAC budget and refit")
    surgery.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                         help="nest the EMA weights of --from (--no-ema: its raw weights)")
    surgery.add_argument("--recalibrate-bn", type=int, default=0, metavar="BATCHES",
                         help="first recompute the base model's BN running statistics over this many training "
                              "batches (stale statistics after a short run mislead the greedy selection); 0 = keep")
    surgery.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                         help="evaluate the base model and every N_s on the test split")
    _add_data_options(nest)
    _mark_preset(nest, _QUICK)

    finetune = commands.add_parser(
        "finetune", formatter_class=_FORMATTER, help="train all RDN exits jointly from one forward pass",
        description="Fine-tune an RDN (--from a nest run): loss = sum_s w_s CE(logits_s, y) over the exits, all from "
        "one forward / backward pass of N_K, optionally with in-place distillation from N_K.",
    )  # fmt: skip
    _add_run_options(finetune, resume=True, quick=quick)
    finetune.add_argument("--from", dest="source", required=True, help="nest run folder or its checkpoint.pt")
    finetune.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                          help="start from the EMA weights of --from (--no-ema: its raw weights)")
    _add_data_options(finetune, training=True)
    _add_training_options(finetune, rdn=True)
    _mark_preset(finetune, _QUICK)

    pipeline = commands.add_parser(
        "pipeline", formatter_class=_FORMATTER, help="pretrain, nest, fine-tune, calibrate early exits, report",
        description="The whole experiment (rdn.experiments.pipeline): pretrain → nest → fine-tune → exit outputs → "
        "nesting order → policy and λ calibration → evaluation → report.md. Re-running resumes.",
    )  # fmt: skip
    _add_pipeline_options(pipeline)

    infer = commands.add_parser(
        "infer", formatter_class=_FORMATTER, help="predict classes of image files with an RDN",
        description="Predictions for image files (a folder, searched recursively, or single files): class, exit "
        "taken and MACs per image, with a static sub-network (--subnet) or early exits (--policy; a pipeline run "
        "folder given to --from uses its policy by default). Images are decoded with Pillow and resized to the model's "
        "input size.",
    )  # fmt: skip
    infer.add_argument("images", nargs="+", help="image files or folders of them")
    infer.add_argument("--from", dest="source", required=True,
                       help="an RDN: a finetune or nest run folder, its checkpoint.pt, or a pipeline run folder")
    infer.add_argument("--subnet", type=int, default=None, help="run sub-network N_s for every image")
    infer.add_argument("--policy", default=None,
                       help="early exits: a pipeline run folder (or its policy.pt) whose policy decides per image")
    infer.add_argument("--epsilon", type=float, default=None,
                       help="with a policy: the calibrated target error to run at (default: the run's operating "
                            "point)")  # fmt: skip
    infer.add_argument("--out", default=None, help="predictions file, .csv or .json (default: CSV on stdout)")
    infer.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    infer.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                       help="the checkpoint's EMA weights (--no-ema: its raw weights)")
    infer.add_argument("--data", dest="dataset", default=None, choices=_datasets(),
                       help="the dataset the model was trained on, for runs whose summary.json does not record its "
                            "input size and normalisation (older runs)")  # fmt: skip
    infer.add_argument("--data-root", default=None, help="with --data: where its files are")
    infer.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs")
    infer.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    infer.add_argument("--walk", choices=("staged", "jump", "recompute"), default="staged",
                       help="the early-exit engine's walk: staged (a stop per planned exit), jump (one step from "
                            "N_1 to N_K for the images that go on) or recompute (one static pass of the whole "
                            "network for them); the same exits")  # fmt: skip
    infer.add_argument("--fold-batch-norms", action="store_true",
                       help="fold BatchNorms into their convs first (an inference copy: the same predictions)")
    infer.add_argument("--channels-last", action="store_true", help="run in the channels_last memory format")
    infer.add_argument("--reuse-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                       help="have glibc keep freed memory for reuse, so large activations skip fresh "
                            "page faults on every batch (network passes about 2x as fast at batch 64+ on a "
                            "CPU; rdn.deploy.reuse_freed_memory)")  # fmt: skip

    calibrate = commands.add_parser(
        "calibrate", formatter_class=_FORMATTER, help="certify early exits on held-out images; one model file",
        description="Train the exit policy of an RDN to predict agreement with N_K (on training images; labels "
        "unused) and certify on the calibration split the most aggressive λ whose rate of predictions that differ "
        "from N_K's is at most --tolerance with probability >= --confidence (rdn.calibration, Learn-then-Test). "
        "Writes one file (rdn.EarlyExitModel: network, policy, λ, input spec) that `rdn infer --from` runs.",
    )  # fmt: skip
    _add_run_options(calibrate, out_help="the model file to write, e.g. model.rdn.pt", progress=True)
    calibrate.add_argument("--from", dest="source", required=True,
                           help="an RDN: a finetune run folder or its checkpoint.pt")
    calibrate.add_argument("--tolerance", type=float, default=0.005,
                           help="tolerated fraction of images predicted differently from N_K (bounds the accuracy "
                                "drop against N_K)")  # fmt: skip
    calibrate.add_argument("--confidence", type=float, default=0.9,
                           help="probability over the calibration draw that the bound holds")
    calibrate.add_argument("--policy-samples", type=int, default=10000,
                           help="training-split images the policy learns from")
    calibrate.add_argument("--policy-epochs", type=int, default=10, help="policy training epochs")
    calibrate.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    calibrate.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                           help="the checkpoint's EMA weights (--no-ema: its raw weights)")
    _add_data_options(calibrate)

    export = commands.add_parser(
        "export", formatter_class=_FORMATTER, help="save a sub-network as a stock torch module",
        description="Export sub-network N_s of an RDN as a module of stock layers (RussianDollNet.export): its "
        "state_dict (torch.save), TorchScript (torch.jit.trace), a torch.export program (.pt2) and ONNX (when the "
        "onnx package is installed), with export.json (input shape, normalisation, classes, MACs, parameters).",
    )  # fmt: skip
    _add_run_options(export)
    export.add_argument("--from", dest="source", required=True,
                        help="an RDN: a finetune or nest run folder, its checkpoint.pt, or a pipeline run folder")
    export.add_argument("--subnet", type=int, required=True, help="the sub-network N_s to export")
    export.add_argument("--format", dest="formats", nargs="+",
                        choices=("state_dict", "torchscript", "exported_program", "onnx"), default=None,
                        help="what to write (default: all but onnx, and onnx too when the onnx package is "
                             "installed)")  # fmt: skip
    export.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="the checkpoint's EMA weights (--no-ema: its raw weights)")
    export.add_argument("--data", dest="dataset", default=None, choices=_datasets(),
                        help="the dataset the model was trained on, for runs whose summary.json does not record it")
    export.add_argument("--data-root", default=None, help="with --data: where its files are")
    return parser


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _run_folder(args: argparse.Namespace) -> Iterator[None]:
    """Hold ``--out`` for the command's lifetime (checked writable, not another run's, locked) before any work.

    Under torchrun only the main process writes, so only it takes the folder; the training loop
    tells the other processes when it was refused. The pipeline holds its own folder, infer writes a file.
    """
    from rdn.files import RunFolder

    if args.command in ("pipeline", "infer", "calibrate") or os.environ.get("RANK", "0") != "0":
        yield
        return
    from rdn.deploy import EXPORT_FILES
    from rdn.train.loop import RUN_FILES, describe_run

    resume = getattr(args, "resume", False)
    if resume and args.overwrite:
        raise CliError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    with RunFolder(args.out) as folder:
        if args.command == "export":
            folder.check_unused(EXPORT_FILES, resume=False, overwrite=args.overwrite, describe=lambda: "an export")
        else:
            folder.check_unused(RUN_FILES, resume=resume, overwrite=args.overwrite,
                                describe=lambda: describe_run(folder.path))
        yield


def _data_config(args: argparse.Namespace):
    from rdn.config import config_from_arguments
    from rdn.steps import DataConfig

    return config_from_arguments(DataConfig, args, defaults=_QUICK if getattr(args, "quick", False) else None)


def _train_config(args: argparse.Namespace):
    from rdn.config import config_from_arguments
    from rdn.train import TrainConfig

    fixed: dict[str, Any] = {"seed": args.seed}
    if getattr(args, "ema_decay", None) == 0:  # --ema-decay 0 turns the EMA off (the config's "not set")
        fixed["ema_decay"] = None
    return config_from_arguments(TrainConfig, args, defaults=_QUICK if args.quick else None, **fixed)


def _load_data(args: argparse.Namespace, config):
    from rdn.steps import load_data

    return load_data(config, args.data_root, args.seed)


def _base_kwargs(args: argparse.Namespace, spec) -> dict:
    return {"name": args.model, "num_classes": spec.num_classes, "input_size": spec.image_size,
            "in_chans": spec.in_chans, "width_mult": args.width_mult}  # fmt: skip


def _cmd_pretrain(args: argparse.Namespace) -> None:
    import torch

    from rdn.models import create
    from rdn.steps import train

    config = _train_config(args)
    data = _load_data(args, _data_config(args))
    torch.manual_seed(args.seed)
    kwargs = _base_kwargs(args, data.spec)
    model = create(**kwargs)
    train(model, data, config, args.out, model_config={"kind": "base", "create": kwargs}, resume=args.resume,
          device=args.device, summary={"command": "pretrain"})  # fmt: skip


def _cmd_nest(args: argparse.Namespace) -> None:
    import torch

    from rdn.config import config_from_arguments
    from rdn.files import write_json
    from rdn.models import create
    from rdn.steps import (
        calibration_batch,
        data_record,
        evaluate_split,
        exit_costs,
        load_trained,
        nest_model,
        recalibrate_bn,
    )
    from rdn.surgery import NestConfig
    from rdn.surgery.config import refuse_unused_budget
    from rdn.train import model_config_of, save_checkpoint

    config = config_from_arguments(NestConfig, args, seed=args.seed)
    # a ValueError: reported as the user's to fix
    refuse_unused_budget(getattr(args, "mac_budget", None), config, getattr(args, "activation_budget", None))
    data = _load_data(args, _data_config(args))
    torch.manual_seed(args.seed)
    if args.source is not None:
        base, model_config, path = load_trained(args.source, "base", use_ema=args.ema)
        kwargs, origin = model_config["create"], str(path)
    else:
        if args.model is None:
            raise CliError("nest needs --from (a pretrain run) or --model (a randomly initialised base model)")
        kwargs = _base_kwargs(args, data.spec)
        base, origin = create(**kwargs), "random initialisation (from-scratch ablation)"
    if args.recalibrate_bn:
        recalibrate_bn(base, data, batches=args.recalibrate_bn)
    expected = (data.spec.in_chans, data.spec.image_size, data.spec.num_classes)
    found = (kwargs["in_chans"], kwargs["input_size"], kwargs["num_classes"])
    if expected != found:
        raise CliError(f"the base model takes (channels, size, classes) = {found}, the data {data.spec.name} has "
                       f"{expected}")  # fmt: skip
    started = time.perf_counter()
    rdn = nest_model(base, calibration_batch(data, args.calib_samples), config, kwargs)
    nest_s = time.perf_counter() - started
    out = Path(args.out)
    save_checkpoint(out / "checkpoint.pt", {"model_config": model_config_of(rdn), "model": rdn.state_dict(),
                                            "ema": None, "step": 0, "epoch": 0})  # fmt: skip
    # The surgery's options at the top level (as summaries always had them), then what it built.
    options = {item.name: getattr(config, item.name) for item in dataclasses.fields(config)}
    summary = {"command": "nest", "from": origin, **options, "num_subnets": rdn.num_subnets,
               "nest_s": round(nest_s, 2), "exits": exit_costs(rdn, data.spec), "base": exit_costs(base, data.spec)[0],
               **data_record(data)}  # fmt: skip
    if args.eval:
        for name, model in (("base", base), ("rdn", rdn)):
            result = evaluate_split(model, data, data.test)
            summary[f"{name}_test_top1"] = [round(v, 3) for v in result.top1]
    write_json(out / "summary.json", summary)
    print(json.dumps({key: value for key, value in summary.items() if key != "data_spec"}, indent=1))


def _cmd_finetune(args: argparse.Namespace) -> None:
    import torch

    from rdn.steps import load_trained, train

    config = _train_config(args)
    data = _load_data(args, _data_config(args))
    torch.manual_seed(args.seed)
    model, model_config, path = load_trained(args.source, "rdn", use_ema=args.ema)
    train(model, data, config, args.out, model_config=model_config, resume=args.resume, device=args.device,
          summary={"command": "finetune", "from": str(path)})  # fmt: skip


def _cmd_pipeline(args: argparse.Namespace) -> None:
    from rdn.experiments.pipeline import main as run_pipeline

    run_pipeline(args)


def _deployable(args: argparse.Namespace):
    from rdn.deploy import load_deployable

    return load_deployable(args.source, use_ema=args.ema, dataset=args.dataset, data_root=args.data_root)


def _cmd_infer(args: argparse.Namespace) -> None:
    from rdn.deploy import ExitRule, find_images, predict, reuse_freed_memory, write_predictions
    from rdn.steps import resolve_device

    if args.reuse_freed_memory:
        reuse_freed_memory()
    deployable = _deployable(args)
    rule = ExitRule.choose(deployable, subnet=args.subnet, policy=args.policy, epsilon=args.epsilon)
    files = find_images(args.images)
    predictions = predict(deployable, files, rule, batch_size=args.batch_size, device=resolve_device(args.device),
                          walk=args.walk, fold_batch_norms=args.fold_batch_norms, channels_last=args.channels_last)
    write_predictions(predictions, args.out)
    print(f"rdn infer: {len(predictions)} images, {rule.describe()}, mean "
          f"{sum(p.macs for p in predictions) / len(predictions) / 1e6:.3f} MMACs per image"
          + (f"; predictions in {args.out}" if args.out else ""), file=sys.stderr)  # fmt: skip


def _cmd_calibrate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from rdn.early_exit import EarlyExitModel
    from rdn.steps import Reiterable, eval_batches, load_trained, resolve_device

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CliError(f"--out {out} exists; give --overwrite to replace it")
    if out.is_dir():
        raise CliError(f"--out {out} is a folder; name the model file to write")
    for name in ("policy_samples", "policy_epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be a positive int, got {getattr(args, name)}")
    device = resolve_device(args.device)
    net, _, checkpoint = load_trained(args.source, "rdn", use_ema=args.ema)
    net = net.to(device).eval()
    data = _load_data(args, _data_config(args))
    try:
        model = EarlyExitModel.calibrate(
            net,
            Reiterable(lambda: eval_batches(data, data.calib, args.batch_size, device)),
            policy_data=Reiterable(lambda: eval_batches(data, data.train, args.batch_size, device,
                                                      limit=args.policy_samples)),  # fmt: skip
            tolerance=args.tolerance, confidence=args.confidence, policy_epochs=args.policy_epochs,
            spec=data.spec, seed=args.seed, progress=args.progress,
        )  # fmt: skip
    except ValueError as error:  # the tolerance or confidence out of range, or no images
        raise CliError(str(error)) from error
    model.save(out)
    where = "every image runs N_K" if model.lam is None else f"λ = {model.lam:.4g}, {model.risk.saving:.1%} of N_K's " \
        "MACs saved on the calibration images"  # fmt: skip
    print(f"rdn calibrate: {checkpoint} on {model.risk.n} calibration images: {where}; {model.guarantee}. "
          f"Saved {out}", file=sys.stderr)  # fmt: skip


def _cmd_export(args: argparse.Namespace) -> None:
    from rdn.deploy import export_subnet

    written = export_subnet(_deployable(args), args.subnet, args.out, formats=args.formats)
    for kind, path in written.items():
        print(f"{kind}: {path}")


_COMMANDS = {"pretrain": _cmd_pretrain, "nest": _cmd_nest, "finetune": _cmd_finetune, "pipeline": _cmd_pipeline,
             "infer": _cmd_infer, "calibrate": _cmd_calibrate, "export": _cmd_export}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rdn`` console script; returns the exit status (module docstring)."""
    from rdn.errors import user_error_types
    from rdn.train import NonFiniteLossError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        with _run_folder(args):
            _COMMANDS[args.command](args)
    except user_error_types() as error:  # the user's to fix: the message, no traceback (rdn.errors)
        if os.environ.get("RDN_TRACEBACK"):
            traceback.print_exc()
        print(f"rdn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"rdn {args.command}: stopped: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
