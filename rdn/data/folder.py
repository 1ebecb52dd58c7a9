"""Image folders streamed from disk: ImageNet-size data with memory independent of its size.

Layout (ImageNet's): ``root/train/<class>/<image>`` and ``root/val/<class>/<image>`` (any of
:data:`rdn.data.IMAGE_SUFFIXES`). Only the file list is held in memory; every image is decoded
(Pillow) and augmented when it is loaded, in the DataLoader's worker processes::

    from rdn.data.folder import image_folder_loaders
    train, val = image_folder_loaders("/data/imagenet", batch_size=256, workers=8)
    rdn.train.fit(net, train, config, eval_data=val)

The transforms are the standard ImageNet recipe, on uint8 ``(C, H, W)`` tensors:

- training: random-resized crop (area 8–100 % of the image, aspect 3/4–4/3, ten tries then a
  centre crop) resized to ``image_size``, horizontal flip with probability 1/2;
- evaluation: resize the shorter side to ``image_size / 0.875`` (256 for 224), centre crop;
- both: scale to [0, 1] and normalise by the ImageNet mean and std (or the ones given).

The command line and the pipeline stream a folder through :func:`folder_splits` (``--data
imagefolder --data-root PATH``): a :class:`FolderSplits` with the same three splits as the
in-memory :class:`rdn.data.DataSplits` (train, a seeded calibration split held out of
``train/``, and ``val/`` as the test split) and a :class:`~rdn.data.DataSpec` (channels, size,
normalisation, class names) that a run records for ``rdn infer``. Its loaders
(:meth:`FolderSplits.train_loader`, :meth:`FolderSplits.eval_loader`) decode batch by batch.

Crop and resize are one Pillow call (``Image.resize(size, box=crop)``). The augmentation of every
sample is a function of (seed, epoch, position in the epoch), whatever process decodes it: the
training loaders' sampler (:class:`SeededSampler`) hands each index over with a seed of its own,
and :class:`ImageFolder` runs the transform with torch's RNG set to it. So ``num_workers`` changes
nothing but speed, and a resumed run (``fit`` sets the sampler's epoch) sees exactly the images an
uninterrupted one does.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from rdn.data import DataSpec, default_calib_size
from rdn.errors import DataError

__all__ = [
    "GREY_MEAN",
    "GREY_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EvalTransform",
    "FolderSplits",
    "ImageFolder",
    "Samples",
    "SeededSampler",
    "TrainTransform",
    "UnreadableImageError",
    "decode_image",
    "folder_splits",
    "image_folder_loaders",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Grey folders: the mean of ImageNet's channel statistics.
GREY_MEAN = (0.449,)
GREY_STD = (0.226,)
# Pillow modes read as one channel (the rest are converted to RGB).
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
# The evaluation resize: the shorter side to image_size / CROP_FRACTION (224 → 256).
CROP_FRACTION = 0.875


def _image_suffixes() -> tuple[str, ...]:
    from rdn.data import IMAGE_SUFFIXES

    return IMAGE_SUFFIXES


def decode_image(path: str | os.PathLike, mode: str = "RGB"):
    """The image file at ``path`` as a Pillow image in ``mode`` (``RGB`` or ``L``), fully read."""
    from PIL import Image  # Pillow: a dependency of matplotlib, always there with rdn

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot decode image {path}: {error}") from error


class UnreadableImageError(DataError, ValueError):
    """An image file Pillow cannot decode, found when it is loaded (a user error: the file is named)."""


def _to_tensor(image, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Pillow image → normalised float tensor (C, H, W)."""
    array = np.asarray(image, dtype=np.uint8)
    pixels = torch.from_numpy(array.reshape(*array.shape[:2], -1).copy()).permute(2, 0, 1)
    scaled = pixels.to(torch.float32) / 255.0
    return (scaled - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


class TrainTransform:
    """Random-resized crop to ``image_size`` + horizontal flip + normalisation (module docstring)."""

    def __init__(
        self,
        image_size: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1 and ratio 0 < lo <= hi, got {scale}, {ratio}")
        self.image_size, self.scale, self.ratio, self.mean, self.std = image_size, scale, ratio, mean, std

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a random crop of ``scale`` of the area and ``ratio`` aspect."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * torch.empty(()).uniform_(*self.scale).item()
            aspect = math.exp(torch.empty(()).uniform_(*log_ratio).item())
            crop_w, crop_h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                left = int(torch.randint(0, width - crop_w + 1, ()).item())
                top = int(torch.randint(0, height - crop_h + 1, ()).item())
                return left, top, left + crop_w, top + crop_h
        # Fall back to the largest centre crop within the ratio range.
        aspect = width / height
        crop_w, crop_h = width, height
        if aspect < self.ratio[0]:
            crop_h = round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            crop_w = round(height * self.ratio[1])
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        return left, top, left + crop_w, top + crop_h

    def __call__(self, image) -> Tensor:
        from PIL import Image

        box = self.crop_box(*image.size)
        image = image.resize((self.image_size, self.image_size), Image.BILINEAR, box=box)
        if torch.rand(()).item() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_tensor(image, self.mean, self.std)


class EvalTransform:
    """Resize the shorter side to ``image_size / 0.875``, centre crop ``image_size``, normalise."""

    def __init__(self, image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:  # fmt: skip
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        self.image_size, self.mean, self.std = image_size, mean, std

    def __call__(self, image) -> Tensor:
        return _to_tensor(self.crop(image), self.mean, self.std)

    def crop(self, image):
        """The resized, centre-cropped Pillow image (``image_size`` square), before normalisation."""
        from PIL import Image

        width, height = image.size
        short = round(self.image_size / CROP_FRACTION)
        scale = short / min(width, height)
        resized = (max(self.image_size, round(width * scale)), max(self.image_size, round(height * scale)))
        left, top = (resized[0] - self.image_size) // 2, (resized[1] - self.image_size) // 2
        # The crop in the original image's coordinates: one resampling, as for training.
        box = (left / scale, top / scale, (left + self.image_size) / scale, (top + self.image_size) / scale)
        return image.resize((self.image_size, self.image_size), Image.BILINEAR, box=box)


class Samples(Sequence):
    """The ``(path, class index)`` pairs of a folder dataset, stored compactly.

    Paths are one numpy byte-string array relative to ``root`` and labels one int32 array: no
    Python object per file. For ImageNet's 1,281,167 training paths (names of its length) that is
    44 MB against 457 MB for a list of ``(Path, int)`` (tracemalloc), and DataLoader workers reading
    it do not touch reference counts, so the forked workers keep sharing its pages instead of
    copying them (the copy-on-access growth of Python lists in workers).
    """

    def __init__(self, root: Path, paths: np.ndarray, labels: np.ndarray) -> None:
        self.root, self.paths, self.labels = root, paths, labels

    @classmethod
    def scan(cls, root: Path, classes: Sequence[str], suffixes: Sequence[str]) -> Samples:
        """Every file under ``root/<class>/`` (recursively, sorted) whose suffix is one of ``suffixes``."""
        paths, labels = [], []
        for label, name in enumerate(classes):
            for path in sorted((root / name).rglob("*")):
                if path.suffix.lower() in suffixes:
                    paths.append(os.fsencode(path.relative_to(root)))
                    labels.append(label)
        return cls(root, np.array(paths, dtype=bytes), np.array(labels, dtype=np.int32))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Samples(self.root, self.paths[index], self.labels[index])
        return self.root / os.fsdecode(self.paths[index]), int(self.labels[index])

    def take(self, indices: Sequence[int] | Tensor) -> Samples:
        """The samples ``indices``, in that order."""
        index = np.asarray(indices, dtype=np.int64)
        return Samples(self.root, self.paths[index], self.labels[index])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Samples):
            return NotImplemented
        return (self.root == other.root and np.array_equal(self.paths, other.paths)
                and np.array_equal(self.labels, other.labels))  # fmt: skip

    __hash__ = None  # mutable arrays inside


class ImageFolder(Dataset):
    """``root/<class>/<image>`` files, decoded and transformed one at a time (only paths in memory,
    compactly: :class:`Samples`).

    Items are ``(transform(image), class index)``; classes are the sorted sub-folder names (or
    ``classes``, to keep train and val in one order).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
        mode: str = "RGB",
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist (expected root/<class>/<image>)")
        self.classes = list(classes) if classes is not None else sorted(
            entry.name for entry in self.root.iterdir() if entry.is_dir() and not entry.name.startswith(".")
        )  # fmt: skip
        if not self.classes:
            raise FileNotFoundError(f"image folder {self.root} has no class sub-folders (expected root/<class>/)")
        suffixes = _image_suffixes()
        self.samples = Samples.scan(self.root, self.classes, suffixes)
        if not len(self.samples):
            raise FileNotFoundError(f"image folder {self.root}: no images ({', '.join(suffixes)}) in its classes")
        self.transform = transform or EvalTransform()
        self.mode = mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Tensor, int]:
        """Sample ``item``: an index, or ``(index, seed)`` (from :class:`SeededSampler`): the transform then
        draws its randomness from torch's RNG seeded with ``seed``, in whatever process runs it."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        path, label = self.samples[index]
        try:
            image = decode_image(path, self.mode)
        except ValueError as error:
            raise UnreadableImageError(str(error)) from None
        if seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):  # the worker's own RNG stream is left as it was
            torch.manual_seed(seed)
            return self.transform(image), label

    def subset(self, indices: Sequence[int] | Tensor) -> ImageFolder:
        """The samples ``indices`` (in that order) as a folder dataset of the same classes and transform."""
        part = copy.copy(self)
        part.samples = self.samples.take(indices)
        return part

    def with_transform(self, transform: Callable) -> ImageFolder:
        """The same samples under another transform (e.g. training files without augmentation)."""
        other = copy.copy(self)
        other.transform = transform
        return other


class SeededSampler(Sampler):
    """A sampler's indices, each with a seed for its augmentation: ``(index, seed)``.

    The seeds are drawn from (``seed``, epoch) in the main process, one per position of the epoch,
    so the augmentation of every sample depends neither on which worker decodes it nor on how many
    there are. ``set_epoch`` (which ``fit`` calls) reaches the wrapped sampler too.
    """

    def __init__(self, sampler: Sampler, seed: int) -> None:
        self.sampler, self.seed, self.epoch = sampler, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        seeds = torch.randint(2**62, (len(self.sampler),), generator=generator).tolist()
        return zip(iter(self.sampler), seeds, strict=True)

    def __len__(self) -> int:
        return len(self.sampler)


def image_folder_loaders(
    root: str | os.PathLike,
    batch_size: int,
    *,
    image_size: int = 224,
    workers: int = 8,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    train_split: str = "train",
    val_split: str = "val",
) -> tuple[DataLoader, DataLoader]:
    """(training, validation) loaders of ``root/train`` and ``root/val``, this process's share.

    ``batch_size`` is per process. Training shuffles with a ``DistributedSampler`` (one shard
    per process, ``fit`` sets its epoch) and drops the last incomplete batch; validation keeps
    every image once over the processes (``DistributedSampler`` without shuffling pads the last
    shard, so with several processes a few images count twice: negligible at ImageNet's size).
    """
    root = Path(root)
    train_set = ImageFolder(root / train_split, TrainTransform(image_size))
    val_set = ImageFolder(root / val_split, EvalTransform(image_size), classes=train_set.classes)
    train_sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, seed=seed, drop_last=True)
    val_sampler = DistributedSampler(val_set, world_size, rank, shuffle=False) if world_size > 1 else None
    common = {"num_workers": workers, "pin_memory": torch.cuda.is_available()}
    train = _FolderLoader(train_set, batch_size, sampler=SeededSampler(train_sampler, seed), drop_last=True,
                          **common)  # fmt: skip
    val = _FolderLoader(val_set, batch_size, sampler=val_sampler, **common)
    return train, val


class _FolderLoader(DataLoader):
    """A DataLoader whose worker processes' :class:`UnreadableImageError` reaches the caller as one
    line naming the file (DataLoader re-raises it with the worker's whole traceback as the message)."""

    def __iter__(self) -> Iterator:
        return _plain_errors(super().__iter__())


def _plain_errors(batches: Iterator) -> Iterator:
    try:
        yield from batches
    except UnreadableImageError as error:
        message = str(error)
        marker = f"{UnreadableImageError.__name__}: "
        if marker in message:  # raised in a worker: the original message ends its traceback
            raise UnreadableImageError(message.rsplit(marker, 1)[1].strip()) from None
        raise


# ----------------------------------------------------------------------------------------------
# A folder as the three splits of a run (the command line's --data imagefolder)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderSplits:
    """A streamed image folder as a run's splits, the counterpart of the in-memory :class:`rdn.data.DataSplits`.

    Attributes:
        train: the training files (``train/`` less ``calib``), :class:`TrainTransform`.
        calib: a seeded random part of ``train/`` held out (surgery's greedy selection, the exit
            policy's calibration), :class:`EvalTransform`.
        test: ``val/`` (or ``test/``), :class:`EvalTransform`.
        spec: channels, crop size, normalisation and class names (``name`` is ``imagefolder``;
            ``crop_padding`` / ``flip`` describe the in-memory augmentation and are unused here).
        root: the folder.
        num_workers: DataLoader worker processes of every loader (0: decode in this process).

    Every split's files are in a seeded random order, so the first ``n`` of a split (calibration
    images, a policy's training subset, a timing batch) mix the classes.
    """

    train: ImageFolder
    calib: ImageFolder
    test: ImageFolder
    spec: DataSpec
    root: Path
    num_workers: int = 0

    def summary(self) -> str:
        spec = self.spec
        return (
            f"imagefolder {self.root} (streamed from disk): {len(self.train)} train / {len(self.calib)} calib / "
            f"{len(self.test)} val, {spec.num_classes} classes, {spec.in_chans}x{spec.image_size}x{spec.image_size}"
        )

    def eval_transform(self) -> EvalTransform:
        return EvalTransform(self.spec.image_size, mean=self.spec.mean, std=self.spec.std)

    def train_loader(self, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Shuffled, augmented training batches, this process's shard (``batch_size`` per process).

        A ``DistributedSampler`` whose indices come with their augmentation seeds
        (:class:`SeededSampler`; ``fit`` sets its epoch): the batches are functions of (seed, epoch),
        whatever ``num_workers``, and a resumed run sees those of an uninterrupted one.
        """
        _check_positive("batch_size", batch_size)
        per_rank = len(self.train) // world_size
        if batch_size > per_rank:
            raise ValueError(f"batch_size {batch_size} (per process, {world_size} process(es)) is larger than the "
                             f"{per_rank} training images each process gets from {len(self.train)}; use a batch "
                             f"size <= {per_rank}")  # fmt: skip
        sampler = DistributedSampler(self.train, world_size, rank, shuffle=True, seed=seed, drop_last=True)
        return _FolderLoader(self.train, batch_size, sampler=SeededSampler(sampler, seed), drop_last=True,
                             num_workers=self.num_workers, pin_memory=torch.cuda.is_available())  # fmt: skip

    def eval_loader(self, dataset: ImageFolder, batch_size: int, *, rank: int = 0, world_size: int = 1,
                    limit: int | None = None) -> DataLoader:  # fmt: skip
        """Batches of the first ``limit`` (default all) samples of ``dataset`` (one of the splits, or a
        subset of one) under the evaluation transform, in order, strided over the processes (every
        sample once: counts add up exactly)."""
        from rdn.data import _StridedSampler

        _check_positive("batch_size", batch_size)
        dataset = dataset.with_transform(self.eval_transform())
        if limit is not None and limit < len(dataset):
            dataset = dataset.subset(range(limit))
        return _FolderLoader(dataset, batch_size, sampler=_StridedSampler(len(dataset), rank, world_size),
                             num_workers=self.num_workers, pin_memory=torch.cuda.is_available())  # fmt: skip


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _probe_mode(folder: ImageFolder, where: str) -> str:
    """``L`` when the first image of every class is grey, else ``RGB`` (headers only; a file Pillow
    cannot open is an :class:`UnreadableImageError` now rather than in the middle of training)."""
    from PIL import Image

    _, first = np.unique(folder.samples.labels, return_index=True)  # the first sample of every class
    modes = []
    for path, _ in (folder.samples[int(index)] for index in first):
        try:
            with Image.open(path) as image:
                modes.append(image.mode)
        except (OSError, ValueError) as error:
            raise UnreadableImageError(f"{where}: cannot decode image {path}: {error}") from None
    return "L" if all(mode in _GREY_MODES for mode in modes) else "RGB"


def _seeded_order(dataset: ImageFolder, seed: int) -> ImageFolder:
    return dataset.subset(torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist())


def folder_splits(
    root: str | os.PathLike | None,
    *,
    image_size: int | None = None,
    calib_size: int | None = None,
    seed: int = 0,
    num_workers: int = 0,
    crop_scale: float = 0.08,
    calib_rule: str = "sixth",
) -> FolderSplits:
    """``root/train/<class>/<image>`` and ``root/val/<class>/<image>`` as a run's streamed splits.

    Only the file lists are read (and one image header per class, for the channels): nothing is
    decoded until a loader asks. Args: ``image_size``: the crop side (default 224); ``calib_size``:
    training images held out for calibration (default :func:`~rdn.data.default_calib_size` under
    ``calib_rule``: a sixth, at most 10,000); ``seed``: the calibration split and the splits'
    orders; ``num_workers``: the loaders' worker processes; ``crop_scale``: the smallest area
    fraction of the training crops (:class:`TrainTransform`'s ``scale`` is ``(crop_scale, 1)``).
    Grey folders (every class's first image grey) give 1-channel images normalised by
    :data:`GREY_MEAN` / :data:`GREY_STD`, the others RGB by ImageNet's mean and std.

    Raises ``FileNotFoundError`` (folder, ``train/``, ``val/``, classes or images missing) or
    ``ValueError`` (train and val classes differ, a bad size) naming the data root
    (``--data-root``), :class:`UnreadableImageError` for an image Pillow cannot open.
    """
    if root is None:
        raise ValueError("the imagefolder data needs --data-root PATH: a folder holding train/<class>/<image> and "
                         "val/<class>/<image> (ImageNet's layout)")  # fmt: skip
    root = Path(root).expanduser()
    where = f"--data-root {root}"
    if not root.is_dir():
        raise FileNotFoundError(f"{where}: no such folder (expected train/<class>/<image> and val/<class>/<image> "
                                "in it)")  # fmt: skip
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"{where}: no train/ folder (expected train/<class>/<image> and val/<class>/<image>)")
    val_dir = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
    if val_dir is None:
        raise FileNotFoundError(f"{where}: no val/ folder (expected train/<class>/<image> and val/<class>/<image>)")
    if image_size is not None:
        _check_positive("image_size", image_size)
    if num_workers is None or isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    classes = _class_folders(root / "train")
    if not classes:
        raise FileNotFoundError(f"{where}: train/ has no class sub-folders (expected train/<class>/<image>)")
    val_classes = _class_folders(val_dir)
    if val_classes != classes:
        missing, extra = sorted(set(classes) - set(val_classes)), sorted(set(val_classes) - set(classes))
        raise ValueError(f"{where}: the classes of train/ and {val_dir.name}/ differ (only in train/: "
                         f"{missing[:5] or 'none'}{' ...' if len(missing) > 5 else ''}; only in {val_dir.name}/: "
                         f"{extra[:5] or 'none'}{' ...' if len(extra) > 5 else ''})")  # fmt: skip
    size = image_size or 224
    try:
        train = ImageFolder(root / "train", classes=classes)
        test = ImageFolder(val_dir, classes=classes)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{where}: {error}") from None
    for split, dataset in (("train", train), (val_dir.name, test)):
        found = set(np.unique(dataset.samples.labels).tolist())
        empty = [name for label, name in enumerate(classes) if label not in found]
        if empty:
            raise FileNotFoundError(f"{where}: {split}/ classes without images: {empty[:5]}"
                                    f"{' ...' if len(empty) > 5 else ''}")  # fmt: skip
    mode = _probe_mode(train, where)
    mean, std = (GREY_MEAN, GREY_STD) if mode == "L" else (IMAGENET_MEAN, IMAGENET_STD)
    calib_size = default_calib_size(len(train), calib_rule) if calib_size is None else calib_size
    if isinstance(calib_size, bool) or not isinstance(calib_size, int) or not 0 < calib_size < len(train):
        raise ValueError(f"calib_size must be in 1..{len(train) - 1} ({where}: train/ holds {len(train)} images), "
                         f"got {calib_size!r}")  # fmt: skip
    for dataset in (train, test):
        dataset.mode = mode
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    calib = train.subset(order[:calib_size]).with_transform(EvalTransform(size, mean=mean, std=std))
    train = train.subset(order[calib_size:]).with_transform(TrainTransform(size, (crop_scale, 1.0), mean=mean,
                                                                            std=std))  # fmt: skip
    test = _seeded_order(test, seed + 2).with_transform(EvalTransform(size, mean=mean, std=std))
    spec = DataSpec("imagefolder", tuple(classes), 1 if mode == "L" else 3, size, mean, std, crop_padding=0,
                    flip=True)  # fmt: skip
    return FolderSplits(train, calib, test, spec, root, num_workers)
