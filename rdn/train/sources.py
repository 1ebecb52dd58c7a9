"""Where the training loop's batches come from: the package's in-memory splits, or any loader.

:func:`rdn.train.fit` takes data the way PyTorch users hold it:

- a ``DataLoader`` (or any iterable) of ``(images, labels)`` batches, already decoded, augmented
  and normalised (e.g. by ``torchvision.transforms.v2`` in its worker processes), one loader per
  process under ``torchrun`` (a ``DistributedSampler`` splits the data); evaluation batches the
  same way, or none;
- :class:`rdn.data.DataSplits` (the package's in-memory datasets): sharded and augmented on the
  device with keyed randomness, as before.

**Resuming a user's loader exactly.** A killed run resumes at the step it stopped, in the middle
of an epoch: the loader is started again for that epoch and the batches already trained on are
drawn and discarded. The resumed run sees exactly the batches of an uninterrupted one when the
loader is *resumable*: its order and its augmentation are functions of (seed, epoch). ``fit``
makes that so where it can, before every epoch:

- a sampler with ``set_epoch`` (``DistributedSampler``) gets the epoch;
- a ``DataLoader`` with a ``generator`` gets it re-seeded from (seed, epoch): its shuffle order
  and its workers' seeds (and with them the augmentation drawn in the workers) follow;
- with ``num_workers=0`` the augmentation draws from the global RNG, which the checkpoint holds:
  it is set aside while the skipped batches are drawn, then restored.

A shuffling ``DataLoader`` without a generator (order drawn from the global RNG at each epoch's
start) is not resumable: a resume then warns that the interrupted epoch's order differs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler

from rdn.data import BatchTransform, DataSplits, ImageDataset, eval_loader, train_loader
from rdn.train.config import TrainConfig
from rdn.train.distributed import DistContext

__all__ = ["LoaderSource", "SplitsSource", "TrainingSource", "dataset_eval_batches", "training_source"]

Batch = tuple[Tensor, Tensor]


class TrainingSource:
    """Batches of every epoch (on the device) and of evaluation, and how many steps an epoch has."""

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def epoch(self, epoch: int, skip: int) -> Iterator[Batch]:
        """The epoch's batches ``(x, y)`` on the device, from batch ``skip`` on."""
        raise NotImplementedError

    def eval_batches(self) -> Iterable[Batch] | None:
        """Evaluation batches ``(x, y)`` on the device (each process its share), or None: no evaluation."""
        raise NotImplementedError


class SplitsSource(TrainingSource):
    """The package's in-memory splits: sharded over the processes, augmented on the device (exact resume)."""

    def __init__(self, data: DataSplits, config: TrainConfig, context: DistContext) -> None:
        if config.batch_size % context.world_size:
            raise ValueError(
                f"batch_size {config.batch_size} must be divisible by the {context.world_size} processes"
            )
        self.data, self.config, self.context = data, config, context
        self.batch_per_rank = config.batch_size // context.world_size
        full_steps = len(data.train) // context.world_size // self.batch_per_rank
        if full_steps == 0:
            raise ValueError(
                f"batch_size {config.batch_size} is larger than the {len(data.train)} training samples "
                f"({context.world_size} process(es)); use a batch size <= {len(data.train)}"
            )
        self._steps = min(full_steps, config.steps_per_epoch or full_steps)
        self._train_transform = BatchTransform(data.spec, train=True, seed=config.seed)
        self._eval_transform = BatchTransform(data.spec, train=False)

    def steps_per_epoch(self) -> int:
        return self._steps

    def epoch(self, epoch: int, skip: int) -> Iterator[Batch]:
        context, device = self.context, self.context.device
        loader = train_loader(
            self.data.train, self.batch_per_rank, seed=self.config.seed, epoch=epoch, rank=context.rank,
            world_size=context.world_size, skip_batches=skip, num_workers=self.config.num_workers,
        )  # fmt: skip
        for images, labels, keys in loader:
            x = self._train_transform(images.to(device, non_blocking=True), keys, epoch)
            yield x, labels.to(device, non_blocking=True)

    def eval_batches(self) -> Iterable[Batch]:
        return dataset_eval_batches(self.data.test, self._eval_transform, self.config.eval_batch_size, self.context)


def dataset_eval_batches(dataset: ImageDataset, transform: BatchTransform, batch_size: int,
                         context: DistContext) -> Iterator[Batch]:  # fmt: skip
    """Normalised evaluation batches ``(x, y)`` of an in-memory dataset on the device, this process's stride."""
    for images, labels, keys in eval_loader(dataset, batch_size, rank=context.rank, world_size=context.world_size):
        yield transform(images.to(context.device), keys), labels.to(context.device)


class LoaderSource(TrainingSource):
    """A user's loader of ``(images, labels)`` batches (module docstring: what makes it resumable)."""

    def __init__(self, train: Iterable, evaluation: Iterable | None, config: TrainConfig, context: DistContext):
        self.train, self.evaluation, self.config, self.context = train, evaluation, config, context
        length = _length(train)
        if length is None and config.steps_per_epoch is None:
            raise ValueError(
                "the training loader has no length: set TrainConfig.steps_per_epoch to say how many batches "
                "make an epoch"
            )
        steps = min(length, config.steps_per_epoch or length) if length is not None else config.steps_per_epoch
        if steps == 0:
            raise ValueError("the training loader yields no batch: an epoch would have 0 steps")
        self._steps = steps

    def steps_per_epoch(self) -> int:
        return self._steps

    def epoch(self, epoch: int, skip: int) -> Iterator[Batch]:
        _prepare_epoch(self.train, self.config.seed, epoch, warn_if_not_resumable=skip > 0)
        device = self.context.device
        iterator = iter(self.train)
        if skip:
            # The checkpoint holds the global RNG as it was after the last trained step: drawing the
            # skipped batches again must not consume it (augmentation in this process draws from it).
            state = torch.get_rng_state()
            for _ in range(skip):
                next(iterator)
            torch.set_rng_state(state)
        for batch in iterator:
            yield _to_device(batch, device, "training")

    def eval_batches(self) -> Iterable[Batch] | None:
        if self.evaluation is None:
            return None
        return (_to_device(batch, self.context.device, "evaluation") for batch in self.evaluation)


def training_source(data, config: TrainConfig, context: DistContext, eval_data: Iterable | None) -> TrainingSource:
    """The source for ``fit``'s ``data`` argument (see :mod:`rdn.train.sources`)."""
    if isinstance(data, DataSplits):
        if eval_data is not None:
            raise ValueError("eval_data is for loaders; DataSplits evaluate on their own test split")
        return SplitsSource(data, config, context)
    if isinstance(data, (Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            "data must be rdn.data.DataSplits or an iterable (e.g. a DataLoader) of (images, labels) batches, "
            f"got {type(data).__name__}"
        )
    return LoaderSource(data, eval_data, config, context)


def _length(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


def _prepare_epoch(loader: Iterable, seed: int, epoch: int, warn_if_not_resumable: bool) -> None:
    """Make the epoch's order and worker seeds functions of (seed, epoch) where the loader allows it."""
    samplers = [getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
    for sampler in samplers:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
    if not isinstance(loader, DataLoader):
        return
    if loader.generator is not None:
        loader.generator.manual_seed(_epoch_seed(seed, epoch))
    elif warn_if_not_resumable and any(isinstance(s, RandomSampler) and s.generator is None for s in samplers):
        warnings.warn(
            "resuming mid-epoch with a shuffling DataLoader that has no generator: its order is drawn from the "
            "global RNG when the epoch starts, so the resumed epoch sees other batches than the interrupted one. "
            "Pass DataLoader(..., generator=torch.Generator()) (fit seeds it per epoch) for an exact resume.",
            RuntimeWarning,
            stacklevel=3,
        )


def _to_device(batch, device: torch.device, what: str) -> Batch:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(f"each {what} batch must be (images, labels), got {type(batch).__name__}")
    images, labels = batch[0], batch[1]
    if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(f"each {what} batch must hold tensors (images, labels), got "
                        f"({type(images).__name__}, {type(labels).__name__})")  # fmt: skip
    if not images.is_floating_point():
        raise TypeError(f"{what} images must be float tensors (decoded and normalised), got {images.dtype}; "
                        "convert them in the loader (e.g. torchvision.transforms.v2.ToDtype(torch.float32, scale=True))"
                        )
    if math.prod(labels.shape) != images.shape[0] or labels.is_floating_point():
        raise ValueError(f"{what} labels must be integer class indices, one per image; got {tuple(labels.shape)} "
                         f"{labels.dtype} for {images.shape[0]} images")  # fmt: skip
    return images.to(device, non_blocking=True), labels.reshape(-1).to(device, non_blocking=True)
