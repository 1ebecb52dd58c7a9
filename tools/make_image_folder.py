"""Build a real JPEG image folder in ImageNet's layout from Fashion-MNIST, for ``--data imagefolder``.

    python -m tools.make_image_folder --out /tmp/fmnist-jpeg-1k --per-class 100
    python -m tools.make_image_folder --out /tmp/fmnist-jpeg-4k --per-class 400 --grey

Writes ``OUT/train/<class>/<index>.jpg`` (the first ``--per-class`` images of each class of
Fashion-MNIST's training set) and ``OUT/val/<class>/<index>.jpg`` (the first ``--val-per-class``
of each class of its test set): 28×28 grey images upscaled (bilinear) to ``--size`` pixels (64 by
default) and saved as JPEG files (quality ``--quality``), **RGB** by default (the three channels
equal, as an RGB photo folder would be read) or one-channel grey with ``--grey``. Class folders are
``<label>_<name>`` (``0_t-shirt_top`` … ``9_ankle_boot``), so their sorted order is Fashion-MNIST's
label order. Fashion-MNIST is read from ``--source`` (default: the Debian package's
``/usr/share/datasets/fashion-mnist``, ``apt-get install dataset-fashion-mnist``).

The training set is 60,000 images (6,000 per class), the test set 10,000 (1,000 per class).
``OUT`` must not exist yet (or be empty): the script never mixes two folders.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

__all__ = ["class_folder_names", "main", "make_image_folder"]


def class_folder_names() -> list[str]:
    """``<label>_<name>`` for Fashion-MNIST's ten classes, in label order (also their sorted order)."""
    from rdn.data import FASHION_MNIST_CLASSES

    return [f"{label}_{re.sub(r'[^a-z0-9-]+', '_', name.lower())}" for label, name in enumerate(FASHION_MNIST_CLASSES)]


def make_image_folder(
    out: str | Path,
    per_class: int,
    *,
    val_per_class: int = 100,
    size: int = 64,
    grey: bool = False,
    quality: int = 90,
    source: str | Path | None = None,
) -> dict[str, int]:
    """Write the folder (module docstring); returns the number of images written per split."""
    import numpy as np
    from PIL import Image

    from rdn.data import FASHION_MNIST_DIR, _find_idx, read_idx

    for name, value, low in (("per_class", per_class, 1), ("val_per_class", val_per_class, 1), ("size", size, 1),
                             ("quality", quality, 1)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: choose a new --out folder")
    root = Path(source) if source is not None else FASHION_MNIST_DIR
    names = class_folder_names()
    written = {}
    for split, prefix, wanted in (("train", "train", per_class), ("val", "t10k", val_per_class)):
        images_file, labels_file = _find_idx(root, prefix, "images"), _find_idx(root, prefix, "labels")
        if images_file is None or labels_file is None:
            raise FileNotFoundError(f"{root} lacks Fashion-MNIST's {prefix}-images / {prefix}-labels IDX files "
                                    "(apt-get install dataset-fashion-mnist, or --source FOLDER)")  # fmt: skip
        images, labels = read_idx(images_file), read_idx(labels_file)
        count = 0
        for label, name in enumerate(names):
            chosen = np.flatnonzero(labels == label)
            if len(chosen) < wanted:
                raise ValueError(f"{split}: class {name} has {len(chosen)} images, fewer than the {wanted} asked for")
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in chosen[:wanted]:
                image = Image.fromarray(images[index]).resize((size, size), Image.BILINEAR)
                (image if grey else image.convert("RGB")).save(folder / f"{index:05d}.jpg", quality=quality)
                count += 1
        written[split] = count
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--out", required=True, help="the folder to create (train/ and val/ inside)")
    parser.add_argument("--per-class", type=int, required=True,
                        help="training images per class (at most 6000; 10 classes)")
    parser.add_argument("--val-per-class", type=int, default=100, help="validation images per class (at most 1000)")
    parser.add_argument("--size", type=int, default=64, help="side of the written images in pixels (upscaled from 28)")
    parser.add_argument("--grey", action="store_true", help="one-channel grey JPEG files instead of RGB")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--source", default=None, help="folder of Fashion-MNIST's IDX files (default: the Debian "
                                                       "package's /usr/share/datasets/fashion-mnist)")  # fmt: skip
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        written = make_image_folder(args.out, args.per_class, val_per_class=args.val_per_class, size=args.size,
                                    grey=args.grey, quality=args.quality, source=args.source)  # fmt: skip
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"make_image_folder: error: {error}", file=sys.stderr)
        return 2
    print(f"{args.out}: {written['train']} train / {written['val']} val JPEG images, {args.size}x{args.size} "
          f"{'grey' if args.grey else 'RGB'}, 10 classes ({time.perf_counter() - started:.1f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
