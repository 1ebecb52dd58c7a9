"""Training: base-model pretraining and joint one-pass fine-tuning of every RDN exit (DESIGN.md §5).

- :class:`TrainConfig` — the run's settings (paper §4.1 recipe scaled to small data, documented there);
- :func:`fit` — the loop (single process or DDP under ``torchrun``), resumable checkpoints, logs;
- :func:`evaluate` — top-1 / top-5 of every exit;
- :func:`load_model`, :func:`load_checkpoint`, :func:`save_checkpoint` — checkpoints.
"""

from rdn.train.checkpoint import (
    CheckpointMismatchError,
    build_model,
    load_checkpoint,
    load_model,
    model_config_of,
    save_checkpoint,
)
from rdn.train.config import EXITS, TrainConfig
from rdn.train.distributed import DistContext, setup_distributed, teardown_distributed
from rdn.train.loop import (
    EvalResult,
    FitResult,
    NonFiniteLossError,
    StepInfo,
    evaluate,
    fit,
    num_exits,
    recalibrate_batch_norm,
    recalibrate_batch_norm_on,
)
from rdn.train.loss import JointLoss, exit_weights
from rdn.train.optim import ModelEma, WarmupCosine

__all__ = [
    "EXITS",
    "CheckpointMismatchError",
    "DistContext",
    "EvalResult",
    "FitResult",
    "JointLoss",
    "ModelEma",
    "NonFiniteLossError",
    "StepInfo",
    "TrainConfig",
    "WarmupCosine",
    "build_model",
    "evaluate",
    "exit_weights",
    "fit",
    "load_checkpoint",
    "load_model",
    "model_config_of",
    "num_exits",
    "recalibrate_batch_norm",
    "recalibrate_batch_norm_on",
    "save_checkpoint",
    "setup_distributed",
    "teardown_distributed",
]
