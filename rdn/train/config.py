"""Training settings: the paper's recipe (§4.1) scaled down to small data and short runs.

Paper (ImageNet, 8 GPUs): SGD + Nesterov momentum 0.9, weight decay 1e-4, learning rate 0.1 at
batch 1024, cosine schedule to 1e-5, EMA of the weights with decay 0.9999, BN decay 0.99
(momentum 0.01), 200 epochs of fine-tuning. What changes here and why:

- ``lr``: 0.1 per 256 images of global batch (linear scaling; the paper's 0.1 at 1024 is a
  quarter of it, tuned for 200 long ImageNet epochs); warm-up over ``warmup_epochs``.
- ``ema_decay`` 0.999 instead of 0.9999, with the warm-up ``min(decay, (1 + t) / (10 + t))``:
  0.9999 averages over ~10,000 steps, more than a whole short run has.
- ``bn_momentum`` 0.1 instead of 0.01 (BN decay 0.9, not 0.99): with 0.01 the running statistics
  average over ~100 steps and lag weights that change fast in a run of a few hundred steps; a
  300-step Fashion-MNIST run measured 86% top-1 with batch statistics and 7% with the 0.01
  running statistics. The paper's value suits its 250,000-step runs (``--bn-momentum 0.01``).
- ``label_smoothing`` 0.1 (the MobileNeXt recipe the paper follows); ``grad_clip`` off, as the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

from rdn.config import Config, setting

__all__ = ["EXITS", "AMP_MODES", "TrainConfig"]

# Which exits the joint loss trains (paper Table 5): all K, all but the lightest N_1, only N_K.
EXITS = ("all", "all_but_lightest", "largest")
AMP_MODES = ("auto", "off", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig(Config):
    """Settings of one training run (pretraining a base model or fine-tuning an RDN).

    Every field's meaning is its ``setting`` help below (also what ``rdn pretrain --help`` shows).
    ``exit_weights``, ``exits`` and ``distill*`` apply to RDNs only. Validated when built; frozen
    (use :meth:`replace`); serialised with a version (:mod:`rdn.config`).
    """

    epochs: int = setting(10, "passes over the training split")
    batch_size: int = setting(128, "global batch size (all processes together; must divide by the process count)")
    lr: float | None = setting(None, "peak learning rate; not set: 0.1 x batch_size / 256")
    min_lr: float = setting(1e-5, "learning rate at the end of the cosine schedule (paper: 1e-5)")
    warmup_epochs: float = setting(1.0, "linear warm-up from 0 to lr, in (fractional) epochs")
    momentum: float = setting(0.9, "SGD momentum (paper: Nesterov 0.9)")
    nesterov: bool = setting(True, "Nesterov momentum")
    weight_decay: float = setting(1e-4, "weight decay of conv / linear weights (not BN, not biases); paper 1e-4")
    label_smoothing: float = setting(0.1, "label smoothing of the cross-entropy targets")
    grad_clip: float | None = setting(None, "clip the global gradient norm to this; not set: no clipping")
    ema_decay: float | None = setting(0.999, "EMA of the weights (with warm-up), evaluated beside the raw weights; "
                                             "not set: no EMA")
    bn_momentum: float | None = setting(0.1, "set on every BatchNorm before training (paper 0.01, for 250k-step "
                                             "runs); not set: leave the model's")
    exits: str = setting("all", "RDN: which exits the joint loss trains (paper Table 5)", choices=EXITS)
    exit_weights: tuple[float, ...] | None = setting(None, "RDN: w_1..w_K of the joint loss sum_s w_s CE_s; not "
                                                           "set: equal weights summing to 1 over the trained exits")
    distill: float = setting(0.0, "RDN: in-place distillation weight a: exits s < K learn (1 - a) CE + a "
                                  "KL(N_K || N_s); 0 = plain CE")
    distill_temperature: float = setting(1.0, "RDN: temperature of the distillation softmaxes")
    amp: str = setting("auto", "mixed precision on GPU (auto: bf16 where supported, else fp16); never on CPU",
                       choices=AMP_MODES)
    channels_last: bool = setting(False, "train in the channels_last memory format (model and batches): the fast "
                                         "layout of tensor-core convolutions on GPUs")
    compile: bool = setting(False, "run the training forward through torch.compile (the model itself stays "
                                   "eager: checkpoints, EMA and evaluation are unchanged)")
    seed: int = setting(0, "seed of weight init, dropout, data order and augmentation")
    steps_per_epoch: int | None = setting(None, "cap on optimisation steps per epoch (smoke runs); not set: the "
                                                "whole split")
    checkpoint_every: int | None = setting(None, "also checkpoint every this many steps (mid-epoch resume); not "
                                                 "set: at epoch ends")
    eval_batch_size: int = setting(512, "batch size of evaluation, per process")
    num_workers: int = setting(0, "DataLoader worker processes")
    progress: bool = setting(True, "show a progress bar and epoch lines (main process)")

    def __post_init__(self) -> None:
        super().__post_init__()

        def positive_int(name: str, value, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")

        def in_range(name: str, value, lo: float, hi: float, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                expected = f"a number in [{lo}, {hi}]{' or None' if allow_none else ''}"
                raise ValueError(f"{name} must be {expected}, got {value!r}")

        positive_int("epochs", self.epochs)
        positive_int("batch_size", self.batch_size)
        positive_int("eval_batch_size", self.eval_batch_size)
        positive_int("steps_per_epoch", self.steps_per_epoch, allow_none=True)
        positive_int("checkpoint_every", self.checkpoint_every, allow_none=True)
        in_range("lr", self.lr, 1e-12, 100.0, allow_none=True)
        in_range("min_lr", self.min_lr, 0.0, 100.0)
        in_range("warmup_epochs", self.warmup_epochs, 0.0, float(self.epochs))
        in_range("momentum", self.momentum, 0.0, 1.0)
        in_range("weight_decay", self.weight_decay, 0.0, 1.0)
        in_range("label_smoothing", self.label_smoothing, 0.0, 1.0)
        in_range("grad_clip", self.grad_clip, 1e-12, float("inf"), allow_none=True)
        in_range("ema_decay", self.ema_decay, 0.0, 1.0, allow_none=True)
        in_range("bn_momentum", self.bn_momentum, 0.0, 1.0, allow_none=True)
        in_range("distill", self.distill, 0.0, 1.0)
        in_range("distill_temperature", self.distill_temperature, 1e-3, 1e3)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {self.num_workers!r}")
        if self.exit_weights is not None:
            # Frozen: the normalised tuple is stored the one way a frozen dataclass allows.
            object.__setattr__(self, "exit_weights", tuple(float(w) for w in self.exit_weights))
            if any(w < 0 for w in self.exit_weights) or not any(self.exit_weights):
                raise ValueError(f"exit_weights must be non-negative and not all zero, got {self.exit_weights}")

    @property
    def peak_lr(self) -> float:
        return 0.1 * self.batch_size / 256 if self.lr is None else self.lr
