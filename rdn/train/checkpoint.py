"""Checkpoints: written atomically, holding everything an exact resume needs.

A checkpoint is one ``torch.save``-d dict:

    format, version     "rdn-checkpoint", 1
    model_config        how to rebuild the model: {"kind": "base", "create": {rdn.models.create kwargs}}
                        or {"kind": "rdn", "rdn_config": RussianDollNet.rdn_config}
    model, ema          state dicts (ema: ModelEma.state_dict() or None)
    optimizer, scheduler, scaler   state dicts (None where not used, e.g. after `rdn nest`)
    rng                 torch (CPU + CUDA), numpy and python generator states
    epoch, step         position: `step` optimisation steps done, `epoch` the epoch they are in
    data                {"seed", "epoch", "batch"}: the data order is a function of (seed, epoch)
                        (DistributedSampler) and the augmentation of (seed, epoch, sample): this
                        is the data-order generator's whole state
    train_config, metrics, extra

Written to a temporary file in the same folder, fsync-ed, then ``os.replace``-d over the
target, so a run killed while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "CheckpointMismatchError",
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
VERSION = 1


class CheckpointMismatchError(ValueError):
    """A checkpoint written for another model (or another kind of file) than the one asked for."""


def model_config_of(model: nn.Module, create_kwargs: dict | None = None) -> dict:
    """The ``model_config`` entry of a checkpoint for ``model``.

    Args:
        model: a :class:`~rdn.surgery.RussianDollNet` (its ``rdn_config`` is used) or a base model.
        create_kwargs: for a base model, the ``rdn.models.create`` arguments that rebuild it;
            without them the checkpoint records only the class name (it can be resumed, not rebuilt).
    """
    from rdn.surgery import RussianDollNet

    if isinstance(model, RussianDollNet):
        return {"kind": "rdn", "rdn_config": model.rdn_config}
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
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    # The generator states are CPU byte tensors; a checkpoint loaded with map_location="cuda" moved them.
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus format tags) to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            torch.save({"format": FORMAT, "version": VERSION, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with clear errors for anything else."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        # Our checkpoints hold numpy / python RNG states, which the weights-only unpickler refuses.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:
        raise CheckpointMismatchError(f"{path} is not a readable torch checkpoint: {error}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{path} is not an rdn checkpoint (no format tag {FORMAT!r})")
    if state.get("version") != VERSION:
        raise CheckpointMismatchError(f"{path} has checkpoint version {state.get('version')}, expected {VERSION}")
    return state


def _describe(model_config: dict) -> str:
    kind = model_config.get("kind")
    if kind == "base":
        return f"base model {model_config['create']}"
    if kind == "rdn":
        config = model_config["rdn_config"]
        return f"RDN (k={config.get('k')}, mode={config.get('mode')}) of {config.get('base')}"
    return f"{kind} {model_config.get('class', '')}".strip()


def _comparable(model_config: dict) -> dict:
    """An RDN's model_config with the rdn_config keys newer versions added filled with their defaults."""
    if model_config.get("kind") != "rdn":
        return model_config
    from rdn.surgery.nest import with_config_defaults

    return {**model_config, "rdn_config": with_config_defaults(model_config["rdn_config"])}


def check_model_config(expected: dict, found: dict, path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointMismatchError` when a checkpoint was written for another model."""
    expected, found = _comparable(expected), _comparable(found)
    if expected != found:
        inner = "rdn_config" if expected.get("kind") == found.get("kind") == "rdn" else None
        a, b = (expected[inner], found[inner]) if inner else (expected, found)
        differing = sorted(key for key in set(a) | set(b) if a.get(key) != b.get(key))
        raise CheckpointMismatchError(
            f"checkpoint {path} was written for {_describe(found)}, but this run has {_describe(expected)} "
            f"(they differ in {differing}); use a fresh --out folder or the matching model settings"
        )


def load_state_strict(module: nn.Module, state_dict: dict, path: str | os.PathLike, what: str = "model") -> None:
    """``load_state_dict(strict=True)`` with shape mismatches reported as a checkpoint mismatch."""
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
