"""The training loop: pretraining a base model and jointly fine-tuning all exits of an RDN.

One loop serves both: a model returning one logits tensor is a model with one exit; a
:class:`~rdn.surgery.RussianDollNet` returns its K exits' logits from one forward pass of N_K,
and one backward pass of the joint loss (:class:`~rdn.train.loss.JointLoss`) trains all of them.

The same code runs single-process (CPU or one GPU) and under ``torchrun`` (DDP, one process per
GPU or several gloo processes on a CPU): ``config.batch_size`` is the global batch, split evenly
over the processes; rank 0 alone draws the progress bar and writes logs and checkpoints.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from rdn.data import BatchTransform, DataSpec, DataSplits, ImageDataset, eval_loader
from rdn.files import RunFolder, RunFolderError
from rdn.train.checkpoint import (
    CheckpointMismatchError,
    check_model_config,
    get_rng_state,
    load_checkpoint,
    load_state_strict,
    model_config_of,
    save_checkpoint,
    set_rng_state,
)
from rdn.train.config import TrainConfig
from rdn.train.distributed import DistContext, all_reduce_sum, average_buffers
from rdn.train.log import RunLog
from rdn.train.loss import JointLoss, exit_weights
from rdn.train.optim import ModelEma, build_optimizer, build_scheduler
from rdn.train.sources import TrainingSource, dataset_eval_batches, training_source

__all__ = [
    "EvalResult",
    "FitResult",
    "NonFiniteLossError",
    "StepInfo",
    "evaluate",
    "fit",
    "num_exits",
    "recalibrate_batch_norm",
    "recalibrate_batch_norm_on",
]

CHECKPOINT_NAME = "checkpoint.pt"
# What a run writes into its folder (summary.json: the CLI's): a new run refuses a folder holding any of them.
RUN_FILES = (CHECKPOINT_NAME, "log.json", "log.csv", "accuracy.png", "summary.json")
# Settings that may change between a run and its resumption: they do not change what is computed.
_RESUMABLE_CHANGES = {"progress", "num_workers", "eval_batch_size", "checkpoint_every"}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN / inf; the last good checkpoint is left on disk."""


@dataclass
class EvalResult:
    """Per-exit accuracy (%) on a split: ``top1[s - 1]`` / ``top5[s - 1]`` of exit s; ``loss`` of the largest exit."""

    top1: list[float]
    top5: list[float]
    loss: float
    samples: int

    def as_row(self, prefix: str) -> dict[str, float]:
        row = {}
        for s, (top1, top5) in enumerate(zip(self.top1, self.top5, strict=True), start=1):
            row[f"{prefix}top1_{s}"] = round(top1, 4)
            row[f"{prefix}top5_{s}"] = round(top5, 4)
        return row


@dataclass
class StepInfo:
    """What a step callback sees after every optimisation step."""

    epoch: int
    step: int  # optimisation steps done so far (global count)
    loss: float  # mean over all processes
    exit_losses: list[float]  # per-exit cross-entropy, mean over all processes


@dataclass
class FitResult:
    model: nn.Module
    ema: ModelEma | None
    history: list[dict] = field(default_factory=list)
    steps: int = 0


def num_exits(model: nn.Module) -> int:
    """K for an RDN (``num_subnets``), 1 for any other classifier."""
    return int(getattr(model, "num_subnets", 1))


def _as_list(outputs: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [outputs] if isinstance(outputs, Tensor) else list(outputs)


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision only on GPU: CPU autocast is slower than fp32 for these convs and changes numerics."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: ImageDataset | Iterable[tuple[Tensor, Tensor]],
    spec: DataSpec | None = None,
    *,
    batch_size: int = 512,
    context: DistContext | None = None,
    amp_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Top-1 / top-5 accuracy of every exit, counts summed over the processes.

    ``data``: an :class:`~rdn.data.ImageDataset` with its ``spec`` (each process evaluates its
    stride, normalised here), or any iterable (e.g. a DataLoader) of ``(images, labels)`` batches
    ready for the model (each process passes its own share).
    """
    context = context or DistContext(device=next(model.parameters()).device)
    if isinstance(data, ImageDataset):
        if spec is None:
            raise ValueError("evaluating an ImageDataset needs its spec (DataSpec: normalisation)")
        batches = dataset_eval_batches(data, BatchTransform(spec, train=False), batch_size, context)
    else:
        batches = ((x.to(context.device), y.reshape(-1).to(context.device)) for x, y, *_ in data)
    return _evaluate_batches(model, batches, context, amp_dtype)


@torch.no_grad()
def _evaluate_batches(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], context: DistContext,
                      amp_dtype: torch.dtype | None) -> EvalResult:  # fmt: skip
    was_training = model.training
    model.eval()
    counts = None  # (K + K + 2,): top-1 hits per exit, top-5 hits per exit, summed loss, samples
    try:
        for x, y in batches:
            with _autocast(context.device, amp_dtype):
                logits = [z.float() for z in _as_list(model(x))]
            top = torch.stack([z.topk(min(5, z.shape[1]), dim=1).indices for z in logits])  # (K, N, k)
            hits = top == y[None, :, None]
            batch_counts = torch.cat([
                hits[:, :, 0].sum(1), hits.any(2).sum(1),
                torch.stack([nn.functional.cross_entropy(logits[-1], y, reduction="sum"),
                             torch.tensor(float(len(y)), device=y.device)]),
            ]).double()  # fmt: skip
            counts = batch_counts if counts is None else counts + batch_counts
    finally:
        model.train(was_training)
    if counts is None:  # this process had no samples (more processes than samples)
        counts = torch.zeros(2 * num_exits(model) + 2, dtype=torch.float64, device=context.device)
    counts = all_reduce_sum(counts, context).cpu()
    k, samples = (len(counts) - 2) // 2, counts[-1].item()
    scale = 100.0 / max(samples, 1)
    return EvalResult((counts[:k] * scale).tolist(), (counts[k : 2 * k] * scale).tolist(),
                      counts[-2].item() / max(samples, 1), int(samples))  # fmt: skip


def recalibrate_batch_norm(model: nn.Module, dataset: ImageDataset, spec: DataSpec, *, batches: int = 20,
                           batch_size: int = 128) -> None:
    """Recompute every BN layer's running statistics as the plain average over ``batches`` batches.

    Running statistics with a small momentum lag the weights after a short or interrupted run;
    surgery (greedy selection, the calibration error) and evaluation read them. Uses the
    un-augmented images, in order; the model is left in the mode it was in.
    """
    device = next(model.parameters()).device
    transform = BatchTransform(spec, train=False)

    def inputs() -> Iterator[Tensor]:
        for index, (images, _, keys) in enumerate(eval_loader(dataset, batch_size)):
            if index >= batches:
                return
            yield transform(images.to(device), keys)

    recalibrate_batch_norm_on(model, inputs())


@torch.no_grad()
def recalibrate_batch_norm_on(model: nn.Module, inputs: Iterable[Tensor]) -> None:
    """Every BN layer's running statistics as the plain average over the batches ``inputs`` (each an
    (N, C, H, W) model input, already on the model's device and normalised); the model is left in
    the mode it was in and its BN momenta as they were."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [m.momentum for m in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    try:
        for x in inputs:
            model(x)
    finally:
        model.train(was_training)
        for module, momentum in zip(norms, saved, strict=True):
            module.momentum = momentum


def _set_bn_momentum(model: nn.Module, momentum: float | None) -> None:
    if momentum is None:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


def _check_resumable(saved: dict, config: TrainConfig, path: Path) -> None:
    """A run resumes only with the same training settings, apart from those that do not change results."""
    changed = config.describe_differences(TrainConfig.from_dict(saved), ignore=_RESUMABLE_CHANGES)
    if changed:
        raise ValueError(f"cannot resume {path} with different training settings ({changed}); use a fresh --out folder")


def _check_current_layout(model: nn.Module, saved: dict, path: Path) -> None:
    """Refuse to resume a run whose weights are stored in an older layout of this model: they load
    (upgraded), but the optimizer and EMA states saved beside them keep the old shapes."""
    upgrade = getattr(model, "upgrade_state_dict", None)
    if upgrade is None:
        return
    upgraded = upgrade(saved)
    if upgraded.keys() != saved.keys() or any(upgraded[key].shape != saved[key].shape for key in saved):
        raise CheckpointMismatchError(
            f"{path} was written by an older rdn whose RDN heads were stored unfolded: its weights load (e.g. "
            "`rdn finetune --from` it, or rdn.train.load_model), but its optimizer state does not fit the current "
            "heads, so this run cannot resume; start a new fine-tuning from it"
        )


def fit(
    model: nn.Module,
    data: DataSplits | Iterable[tuple[Tensor, Tensor]],
    config: TrainConfig,
    *,
    eval_data: Iterable[tuple[Tensor, Tensor]] | None = None,
    out: str | os.PathLike | None = None,
    model_config: dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
    context: DistContext | None = None,
    callbacks: Sequence[Callable[[StepInfo], None]] = (),
) -> FitResult:
    """Train ``model``, evaluating every exit after each epoch.

    Args:
        model: a base classifier (one exit) or a RussianDollNet (K exits).
        data: a DataLoader (or any iterable) of ``(images, labels)`` batches ready for the model —
            this process's share under torchrun — or :class:`rdn.data.DataSplits` (the package's
            in-memory datasets: trains on ``data.train``, evaluates on ``data.test``). What makes
            a loader resume exactly: :mod:`rdn.train.sources`.
        config: the run's settings (``batch_size`` is the global batch of DataSplits; with a
            loader it only sets the default learning rate: the loader decides its batches).
        eval_data: with a loader, the evaluation batches (this process's share), or None: no
            per-epoch evaluation.
        out: run folder for ``checkpoint.pt`` and the logs (``None``: nothing written).
        model_config: how to rebuild the model (see :func:`~rdn.train.checkpoint.model_config_of`);
            default: derived from the model (RDNs carry their record, :class:`rdn.surgery.NestRecord`).
        resume: continue from ``out/checkpoint.pt`` if it exists (exactly where it stopped,
            mid-epoch included).
        overwrite: ``out`` may hold an earlier run, whose files are deleted first. Without it (and
            without ``resume``) a folder holding a run is refused: nothing is overwritten by accident.
        context: the process group (:func:`~rdn.train.distributed.setup_distributed`); default: one
            process on the model's device.
        callbacks: called with a :class:`StepInfo` after every optimisation step.

    The run folder is checked (writable, not holding another run) and locked for the whole call
    before any work starts (:class:`rdn.files.RunFolder`); only the main process writes it.

    Raises:
        NonFiniteLossError: the loss became NaN / inf (before the step that would apply it).
        rdn.files.RunFolderError: ``out`` cannot be written, holds another run, or is in use.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if resume and out is None:
        raise ValueError("resume=True needs out, the run folder holding checkpoint.pt")
    if resume and overwrite:
        raise ValueError("resume=True and overwrite=True contradict each other: continue the run or replace it")
    context = context or DistContext(device=next(model.parameters()).device)
    with ExitStack() as held:
        refused = None
        if out is not None and context.is_main:
            try:
                folder = held.enter_context(RunFolder(out))
                folder.check_unused(RUN_FILES, resume=resume, overwrite=overwrite,
                                    describe=lambda: describe_run(folder.path))
            except RunFolderError as error:
                refused = error
        # Every process learns the main one's verdict: a worker must not train on while the main one gave up.
        if all_reduce_sum(torch.tensor([float(refused is not None)], device=context.device), context).item():
            raise refused or RunFolderError(f"the main process refused the run folder {out} (see its error)")
        source = training_source(data, config, context, eval_data)
        return _fit(model, source, config, out, model_config, resume, context, callbacks)


def describe_run(folder: Path) -> str:
    """What the run in ``folder`` is, from its checkpoint's position (read as data), for error messages."""
    path = folder / CHECKPOINT_NAME
    if not path.is_file():
        return ""
    try:
        state = load_checkpoint(path)
    except ValueError:
        return "an unreadable checkpoint"
    epochs = (state.get("train_config") or {}).get("epochs", "?")
    return f"epoch {state.get('epoch')} of {epochs}, step {state.get('step')}"


def _fit(model, source: TrainingSource, config, out, model_config, resume, context, callbacks) -> FitResult:
    device = context.device
    steps_per_epoch = source.steps_per_epoch()
    total_steps = steps_per_epoch * config.epochs

    model_config = model_config or model_config_of(model)
    model.to(device)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    _set_bn_momentum(model, config.bn_momentum)
    weights = exit_weights(num_exits(model), config.exits, config.exit_weights)
    loss_fn = JointLoss(weights, config.label_smoothing, config.distill, config.distill_temperature)
    optimizer = build_optimizer(model, config.peak_lr, config.momentum, config.nesterov, config.weight_decay)
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    scheduler = build_scheduler(optimizer, total_steps, warmup_steps, config.peak_lr, config.min_lr)
    amp_dtype = _amp_dtype(config.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = ModelEma(model, config.ema_decay) if config.ema_decay is not None else None
    torch.manual_seed(config.seed)  # dropout; data order and augmentation are keyed on the seed separately

    out = Path(out) if out is not None else None
    checkpoint_path = out / CHECKPOINT_NAME if out is not None else None
    step = 0
    resumed_totals = None  # the interrupted epoch's running sums (summed loss, hits, samples, seconds)
    if resume and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path, map_location=device)
        check_model_config(model_config, state["model_config"], checkpoint_path)
        _check_resumable(state["train_config"], config, checkpoint_path)
        _check_current_layout(model, state["model"], checkpoint_path)
        load_state_strict(model, state["model"], checkpoint_path)
        if ema is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step = state["step"]
        resumed_totals = state.get("epoch_totals")
    log = RunLog(out) if out is not None and context.is_main else None

    def save(epoch: int, metrics: dict | None = None, totals: Tensor | None = None) -> None:
        if checkpoint_path is None or not context.is_main:
            return
        save_checkpoint(checkpoint_path, {
            "model_config": model_config, "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "rng": get_rng_state(), "epoch": epoch, "step": step,
            "data": {"seed": config.seed, "epoch": epoch, "batch": step - epoch * steps_per_epoch},
            "train_config": config.to_dict(), "metrics": metrics,
            "epoch_totals": totals.tolist() if totals is not None else None,
        })  # fmt: skip

    trained = model
    if context.distributed:
        # Exits with weight 0 still run forward but get no gradient: DDP must be told.
        trained = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=not all(weights),
        )
    if config.compile:
        trained = torch.compile(trained)  # same parameters: optimizer, EMA and checkpoints see the eager model
    history = list(log.rows) if log is not None else []
    for epoch in range(step // steps_per_epoch, config.epochs):
        skip = step - epoch * steps_per_epoch
        trained.train()
        # Summed loss, top-1 hits of the largest exit, samples, seconds: checkpointed mid-epoch, so the
        # epoch's logged metrics cover every step of it, also those before a resume.
        totals = torch.zeros(4, dtype=torch.float64)
        if skip and resumed_totals is not None:
            totals = torch.tensor(resumed_totals, dtype=torch.float64)
        started = time.perf_counter() - totals[3].item()
        bar = _progress_bar(config, context, epoch, steps_per_epoch, skip)
        batches = itertools.islice(source.epoch(epoch, skip), steps_per_epoch - skip)  # never a batch too many
        for batch_index, (x, y) in enumerate(batches, start=skip):
            if x.dim() == 4:
                x = x.contiguous(memory_format=memory_format)
            with _autocast(device, amp_dtype):
                logits = _as_list(trained(x))
            loss, exit_ce = loss_fn(logits, y)
            correct = (logits[-1].detach().argmax(1) == y).sum()
            reduced = torch.cat([loss.detach().reshape(1), correct.reshape(1).to(loss.dtype), exit_ce])
            reduced = all_reduce_sum(reduced, context) / context.world_size  # one sync per step, also the NaN check
            mean_loss = reduced[0].item()
            if not math.isfinite(mean_loss):
                where = f"last good checkpoint: {checkpoint_path}" if checkpoint_path is not None else "no checkpoint"
                raise NonFiniteLossError(
                    f"training loss is {mean_loss} at epoch {epoch}, step {step + 1} (before applying it; {where}). "
                    "Lower --lr, enable --grad-clip or --amp off, then resume."
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            step += 1
            global_batch = len(y) * context.world_size
            totals[:3] += torch.tensor([mean_loss * global_batch, reduced[1].item() * context.world_size,
                                        global_batch], dtype=torch.float64)  # fmt: skip
            if bar is not None:
                elapsed = time.perf_counter() - started
                bar.set_postfix(loss=f"{totals[0] / totals[2]:.3f}", acc=f"{100 * totals[1] / totals[2]:.1f}%",
                                img_s=f"{totals[2] / elapsed:.0f}", refresh=False)  # fmt: skip
                bar.update(1)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and batch_index + 1 < steps_per_epoch:
                totals[3] = time.perf_counter() - started
                save(epoch, totals=totals)
            info = StepInfo(epoch, step, mean_loss, reduced[2:].tolist())
            for callback in callbacks:
                callback(info)
        if bar is not None:
            bar.close()
        # Every process evaluates and rank 0 saves the same running statistics (timm's distributed BN "reduce").
        average_buffers(model, context)
        if ema is not None:
            average_buffers(ema.module, context)
        epoch_s = time.perf_counter() - started
        row = {
            "epoch": epoch + 1, "step": step, "lr": scheduler.get_last_lr()[0],
            "train_loss": round(float(totals[0] / max(totals[2], 1)), 5),
            "train_top1": round(float(100 * totals[1] / max(totals[2], 1)), 3),
            "images_per_s": round(float(totals[2] / epoch_s), 1), "epoch_s": round(epoch_s, 2),
        }  # fmt: skip
        if source.eval_batches() is not None:
            result = _evaluate_batches(model, source.eval_batches(), context, amp_dtype)
            row |= {"test_loss": round(result.loss, 5), **result.as_row("test_")}
            if ema is not None:
                row |= _evaluate_batches(ema.module, source.eval_batches(), context, amp_dtype).as_row("ema_test_")
        history = [r for r in history if r["epoch"] != row["epoch"]] + [row]
        if log is not None:
            log.append(row)
            _print_epoch(row, num_exits(model), config)
        save(epoch + 1, row)
    return FitResult(model, ema, history, step)


def _progress_bar(config: TrainConfig, context: DistContext, epoch: int, steps: int, done: int):
    if not (config.progress and context.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, initial=done, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", dynamic_ncols=True)


def _print_epoch(row: dict, exits: int, config: TrainConfig) -> None:
    if not config.progress:
        return
    ema = "ema_test_top1_1" in row
    prefix = "ema_test_top1_" if ema else "test_top1_"
    accuracies = " ".join(f"{row[f'{prefix}{s}']:.2f}" for s in range(1, exits + 1))
    print(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}, test top-1 per exit{' (EMA)' if ema else ''} "
          f"[{accuracies}] %, {row['images_per_s']:.0f} img/s", flush=True)
