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

Crop and resize are one Pillow call (``Image.resize(size, box=crop)``). Random draws use torch's
RNG, which each DataLoader worker seeds from the loader's generator: with a generator (as
:func:`image_folder_loaders` gives), ``fit`` re-seeds it per epoch and a resumed run sees
exactly the images an uninterrupted one does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EvalTransform",
    "ImageFolder",
    "TrainTransform",
    "decode_image",
    "image_folder_loaders",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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
        from PIL import Image

        width, height = image.size
        short = round(self.image_size / CROP_FRACTION)
        scale = short / min(width, height)
        resized = (max(self.image_size, round(width * scale)), max(self.image_size, round(height * scale)))
        left, top = (resized[0] - self.image_size) // 2, (resized[1] - self.image_size) // 2
        # The crop in the original image's coordinates: one resampling, as for training.
        box = (left / scale, top / scale, (left + self.image_size) / scale, (top + self.image_size) / scale)
        image = image.resize((self.image_size, self.image_size), Image.BILINEAR, box=box)
        return _to_tensor(image, self.mean, self.std)


class ImageFolder(Dataset):
    """``root/<class>/<image>`` files, decoded and transformed one at a time (only paths in memory).

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
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((self.root / name).rglob("*"))
            if path.suffix.lower() in suffixes
        ]
        if not self.samples:
            raise FileNotFoundError(f"image folder {self.root}: no images ({', '.join(suffixes)}) in its classes")
        self.transform = transform or EvalTransform()
        self.mode = mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        return self.transform(decode_image(path, self.mode)), label


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
    # No persistent workers: each epoch's workers are seeded afresh from the generator ``fit`` re-seeds,
    # which is what makes a resumed epoch draw the same augmentation as an uninterrupted one.
    common = {"num_workers": workers, "pin_memory": torch.cuda.is_available()}
    train = DataLoader(train_set, batch_size, sampler=train_sampler, drop_last=True,
                       generator=torch.Generator().manual_seed(seed), **common)  # fmt: skip
    val = DataLoader(val_set, batch_size, sampler=val_sampler, **common)
    return train, val
