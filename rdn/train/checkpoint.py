"""Checkpoints: written atomically, holding everything an exact resume needs, loaded as data only.

A checkpoint is one ``torch.save``-d dict of tensors and plain values (dicts, lists, tuples,
strings, numbers, None) — nothing else, so that :func:`load_checkpoint` reads it with PyTorch's
weights-only unpickler and **loading a checkpoint never executes code**, whoever wrote the file.
A file that refers to any other Python object is refused with :class:`UnsafeCheckpointError`.

    format, version     "rdn-checkpoint", 2
    model_config        how to rebuild the model: {"kind": "base", "create": {rdn.models.create kwargs}}
                        or {"kind": "rdn", "rdn_config": RussianDollNet.record.to_dict()} (older files:
                        the flat RussianDollNet.rdn_config dict, still read)
    model, ema          state dicts (ema: ModelEma.state_dict() or None)
    optimizer, scheduler, scaler   state dicts (None where not used, e.g. after `rdn nest`)
    rng                 torch (CPU + CUDA), numpy and python generator states, as tensors and lists
    epoch, step         position: `step` optimisation steps done, `epoch` the epoch they are in
    data                {"seed", "epoch", "batch"}: the data order is a function of (seed, epoch)
                        (DistributedSampler) and the augmentation of (seed, epoch, sample): this
                        is the data-order generator's whole state
    epoch_totals        running sums of the interrupted epoch's training metrics (loss × samples,
                        top-1 hits, samples, seconds), so a resumed epoch logs the whole epoch
    train_config, metrics, extra

Version 1 files (written before 2026-12) stored the numpy RNG state as a pickled numpy array;
they are still read, with exactly the numpy globals that rebuild a plain array allowed.

Written to a temporary file in the same folder, fsync-ed, then ``os.replace``-d over the
target, so a run killed while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rdn.files import UnsafeFileError, atomic_write, load_torch_data

__all__ = [
    "CheckpointMismatchError",
    "UnsafeCheckpointError",
    "build_model",
    "check_model_config",
    "get_rng_state",
    "load_checkpoint",
    "load_model",
    "load_state_strict",
    "model_config_of",
    "save_checkpoint",
    "set_rng_state",
]

FORMAT = "rdn-checkpoint"
VERSION = 2
# Version 1 pickled numpy's RNG state as an ndarray: these globals rebuild a plain array and nothing else.
_VERSION_1_GLOBALS = ("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray",
                      "numpy.dtype", "numpy.dtypes.UInt32DType")  # fmt: skip


class CheckpointMismatchError(ValueError):
    """A checkpoint written for another model (or another kind of file) than the one asked for."""


class UnsafeCheckpointError(CheckpointMismatchError, UnsafeFileError):
    """A file that would run code when unpickled (it refers to Python objects other than tensors and plain values)."""


def model_config_of(model: nn.Module, create_kwargs: dict | None = None) -> dict:
    """The ``model_config`` entry of a checkpoint for ``model``.

    Args:
        model: a :class:`~rdn.surgery.RussianDollNet` (its typed ``record``, serialised) or a base model.
        create_kwargs: for a base model, the ``rdn.models.create`` arguments that rebuild it;
            without them the checkpoint records only the class name (it can be resumed, not rebuilt).
    """
    from rdn.surgery import RussianDollNet

    if isinstance(model, RussianDollNet):
        return {"kind": "rdn", "rdn_config": model.record.to_dict()}
    if create_kwargs is not None:
        return {"kind": "base", "create": dict(create_kwargs)}
    return {"kind": "module", "class": f"{type(model).__module__}.{type(model).__qualname__}"}


def build_model(model_config: dict) -> nn.Module:
    """A freshly initialised model of the architecture ``model_config`` describes (weights not loaded)."""
    kind = model_config.get("kind") if isinstance(model_config, dict) else None
    if kind == "base":
        from rdn.models import create

        return create(**model_config["create"])
    if kind == "rdn":
        from rdn.surgery import RussianDollNet

        return RussianDollNet.from_config(model_config["rdn_config"])
    raise CheckpointMismatchError(
        f"cannot rebuild a model from model_config {model_config!r}: only 'base' (rdn.models.create) and 'rdn' "
        "checkpoints carry their architecture"
    )


def get_rng_state() -> dict[str, Any]:
    """Every generator a training step draws from, as tensors and plain values (weights-only loadable)."""
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {**numpy_state, "state": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                                           "pos": int(numpy_state["state"]["pos"])}},
        "python": list(random.getstate()),
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned (or a version-1 checkpoint's pickled states)."""
    # The generator states are CPU byte tensors; a checkpoint loaded with map_location="cuda" moved them.
    torch.set_rng_state(state["torch"].cpu())
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        key = numpy_state["state"]["key"]
        key = key.cpu().numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
        numpy_state = {**numpy_state, "state": {**numpy_state["state"], "key": key.astype(np.uint32)}}
    np.random.set_state(numpy_state)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus format tags) to ``path`` atomically; returns the path.

    ``state`` must hold only tensors and plain values (what :func:`load_checkpoint` accepts): the
    file is checked by loading it back weights-only before it replaces the previous checkpoint.
    """
    def write(tmp: Path) -> None:
        torch.save({"format": FORMAT, "version": VERSION, **state}, tmp)
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(tmp)
        if unsafe:
            raise TypeError(f"checkpoint state for {path} holds objects that are not tensors or plain values "
                            f"({', '.join(unsafe)}); convert them before saving")  # fmt: skip

    return atomic_write(path, write)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with clear errors for anything else.

    Only PyTorch's weights-only unpickler reads the file: tensors and plain values. A file that
    refers to any other Python object — which a full unpickler would import and could call — is
    refused with :class:`UnsafeCheckpointError` naming the file and the objects; nothing in it runs.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state, allowed = load_torch_data(path, map_location, allow=_VERSION_1_GLOBALS, what="checkpoint")
    except UnsafeFileError as error:
        raise UnsafeCheckpointError(str(error)) from error
    except ValueError as error:
        raise CheckpointMismatchError(str(error)) from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{path} is not an rdn checkpoint (no format tag {FORMAT!r})")
    if state.get("version") not in (1, VERSION):
        raise CheckpointMismatchError(f"{path} has checkpoint version {state.get('version')}, expected {VERSION}")
    if allowed and state.get("version") != 1:
        raise UnsafeCheckpointError(f"{path} (version {state.get('version')}) holds numpy objects {allowed}; "
                                    "only version-1 checkpoints may")  # fmt: skip
    return state


def _describe(model_config: dict) -> str:
    kind = model_config.get("kind")
    if kind == "base":
        return f"base model {model_config['create']}"
    if kind == "rdn":
        record = model_config["rdn_config"]
        return f"RDN (k={record.config.k}, mode={record.config.mode}) of {record.base}"
    return f"{kind} {model_config.get('class', '')}".strip()


def _comparable(model_config: dict) -> dict:
    """``model_config`` with an RDN's record read into a :class:`~rdn.surgery.NestRecord` (any version)."""
    if model_config.get("kind") != "rdn":
        return model_config
    from rdn.surgery import NestRecord

    return {**model_config, "rdn_config": NestRecord.read(model_config["rdn_config"])}


def check_model_config(expected: dict, found: dict, path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointMismatchError` when a checkpoint was written for another model.

    RDNs are compared as records (:class:`~rdn.surgery.NestRecord`, whatever version each file
    holds), ignoring ``ties`` and ``search`` (how the surgery chose, not what it built); the error
    names the differing fields.
    """
    expected, found = _comparable(expected), _comparable(found)
    if expected.get("kind") == found.get("kind") == "rdn":
        differing = expected["rdn_config"].differences(found["rdn_config"], ignore=("ties", "search"))
    elif expected != found:
        differing = sorted(key for key in set(expected) | set(found) if expected.get(key) != found.get(key))
    else:
        differing = []
    if differing:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written for {_describe(found)}, but this run has {_describe(expected)} "
            f"(they differ in {differing}); use a fresh --out folder or the matching model settings"
        )


def load_state_strict(module: nn.Module, state_dict: dict, path: str | os.PathLike, what: str = "model") -> None:
    """``load_state_dict(strict=True)`` with shape mismatches reported as a checkpoint mismatch.

    A module with an ``upgrade_state_dict`` method (an RDN, whose older checkpoints store unfolded
    heads) first brings ``state_dict`` to its current layout, so the comparison is with what it loads.
    """
    upgrade = getattr(module, "upgrade_state_dict", None)
    if callable(upgrade):
        state_dict = upgrade(state_dict)
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(own[key].shape)}"
              for key in set(own) & set(state_dict) if state_dict[key].shape != own[key].shape]  # fmt: skip
    if missing or unexpected or shapes:
        details = "; ".join(
            part for part in (
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}" if missing else "",
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}" if unexpected else "",
                f"shape mismatch {shapes[:3]}" if shapes else "",
            ) if part
        )  # fmt: skip
        raise CheckpointMismatchError(f"{what} weights in {path} do not fit this model: {details}")
    module.load_state_dict(state_dict)


def load_model(path: str | os.PathLike, use_ema: bool = True, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a checkpoint and load its weights (the EMA weights when present and ``use_ema``)."""
    state = load_checkpoint(path, map_location)
    model = build_model(state["model_config"])
    weights = state["ema"]["module"] if use_ema and state.get("ema") else state["model"]
    load_state_strict(model, weights, path)
    return model.eval()
