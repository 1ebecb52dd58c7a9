"""rdn.data.folder: image folders streamed from disk with the ImageNet recipe, into fit."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from rdn.data.folder import EvalTransform, ImageFolder, TrainTransform, image_folder_loaders
from rdn.train import TrainConfig, fit
from tests.train.helpers import TinyNet


def write_folder(root, sizes=((40, 30), (25, 50), (64, 64)), classes=("cat", "dog")):
    """root/{train,val}/<class>/<i>.{png,jpg}: images of several sizes whose colour tells the class."""
    for split in ("train", "val"):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index, size in enumerate(sizes):
                colour = (200, 30, 30) if label == 0 else (30, 30, 200)
                Image.new("RGB", size, colour).save(folder / f"{index}.{'png' if index % 2 else 'jpg'}")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


def test_folder_lists_files_and_decodes_on_access(tmp_path):
    write_folder(tmp_path)
    dataset = ImageFolder(tmp_path / "train", EvalTransform(32))
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 6
    image, label = dataset[4]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 1
    assert image[2].mean() > image[0].mean()  # blue dog after normalisation
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        ImageFolder(tmp_path / "train" / "cat")
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    broken = ImageFolder(tmp_path / "train")
    index = [i for i, (path, _) in enumerate(broken.samples) if path.name == "broken.png"][0]
    with pytest.raises(ValueError, match="cannot decode image .*broken.png"):
        broken[index]


def test_train_transform_crops_within_the_image_and_is_seeded():
    transform = TrainTransform(16)
    for width, height in ((40, 30), (25, 50), (16, 16), (300, 20)):
        for _ in range(20):
            left, top, right, bottom = transform.crop_box(width, height)
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
    image = Image.new("RGB", (40, 30))
    image.putpixel((0, 0), (255, 255, 255))
    torch.manual_seed(5)
    first = transform(image)
    torch.manual_seed(5)
    assert torch.equal(first, transform(image)) and first.shape == (3, 16, 16)


def test_eval_transform_resizes_the_shorter_side_then_centre_crops():
    image = Image.new("RGB", (64, 32))
    for x in range(64):
        for y in range(32):
            image.putpixel((x, y), (4 * x, 0, 0))
    out = EvalTransform(28, mean=(0, 0, 0), std=(1, 1, 1))(image)
    # Shorter side 32 -> 32 (28 / 0.875): the crop is the central 28 of 64 columns, so red spans ~[18, 46) * 4.
    assert out.shape == (3, 28, 28)
    red = out[0] * 255
    assert abs(red[:, 0].mean().item() - 4 * 18.5) < 6 and abs(red[:, -1].mean().item() - 4 * 45.5) < 6


@pytest.mark.parametrize("workers", [0, 2])
def test_fit_trains_on_streamed_folders(tmp_path, workers):
    write_folder(tmp_path)
    train, val = image_folder_loaders(tmp_path, batch_size=2, image_size=16, workers=workers)
    assert len(train) == 3 and len(val) == 3
    torch.manual_seed(0)
    model = TinyNet(num_classes=2)
    model.stem = torch.nn.Conv2d(3, 8, 3, padding=1)  # RGB input
    config = TrainConfig(epochs=6, batch_size=2, lr=0.1, warmup_epochs=0, progress=False, ema_decay=None,
                         label_smoothing=0.0, weight_decay=0.0)
    result = fit(model, train, config, eval_data=val)
    assert result.steps == 18 and result.history[-1]["test_top1_1"] == 100.0  # the colour is learnt


def test_folder_splits_hold_out_a_seeded_calibration_split_and_mix_the_classes(tmp_path):
    from rdn.data.folder import folder_splits

    for split, count in (("train", 12), ("val", 3)):
        for label, name in enumerate(("cat", "dog", "owl")):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                Image.new("RGB", (20, 24), (80 * label, 0, 0)).save(folder / f"{index}.jpg")
    data = folder_splits(tmp_path, image_size=16, calib_size=6, seed=3)
    assert (len(data.train), len(data.calib), len(data.test)) == (30, 6, 9)
    assert data.spec.classes == ("cat", "dog", "owl") and (data.spec.in_chans, data.spec.image_size) == (3, 16)
    train_files = {path for path, _ in data.train.samples}
    assert train_files.isdisjoint(path for path, _ in data.calib.samples)
    assert len(train_files | {path for path, _ in data.calib.samples}) == 36
    again, other = folder_splits(tmp_path, image_size=16, calib_size=6, seed=3), folder_splits(tmp_path, calib_size=6)
    assert again.calib.samples == data.calib.samples and other.calib.samples != data.calib.samples
    assert other.spec.image_size == 224  # the ImageNet default
    assert len({label for _, label in data.test.samples[:4]}) > 1  # val in a seeded order, not class by class
    assert isinstance(data.train.transform, TrainTransform) and isinstance(data.calib.transform, EvalTransform)
    # Evaluation batches: the first `limit` samples, without augmentation (training files too), strided over ranks.
    batches = list(data.eval_loader(data.train, 4, limit=10))
    assert [len(y) for _, y in batches] == [4, 4, 2] and batches[0][0].shape == (4, 3, 16, 16)
    first = torch.cat([x for x, _ in data.eval_loader(data.train, 4, limit=10)])
    assert torch.equal(first, torch.cat([x for x, _ in batches]))  # no random crop or flip
    ranks = [[y for _, y in data.eval_loader(data.test, 2, rank=r, world_size=2)] for r in (0, 1)]
    assert sum(len(torch.cat(r)) for r in ranks) == 9
    with pytest.raises(ValueError, match="batch_size 31 .* larger than the 30 training images"):
        data.train_loader(31)


def test_the_in_memory_loader_refuses_the_streamed_dataset():
    from rdn.data import load_dataset

    with pytest.raises(ValueError, match="imagefolder is streamed from disk"):
        load_dataset("imagefolder", "/tmp")


def test_data_config_version_1_reads_and_workers_are_checked():
    from rdn.config import ConfigError
    from rdn.steps import DataConfig

    assert DataConfig.from_dict({"kind": "DataConfig", "version": 1, "dataset": "mnist5k", "calib_size": None,
                                 "image_size": None}) == DataConfig(dataset="mnist5k", num_workers=0,
                                                                    calib_rule="tenth")  # fmt: skip
    # Version 2 held out a tenth of the training data when calib_size was not set: it still does.
    version_2 = {**DataConfig().to_dict(), "version": 2}
    del version_2["calib_rule"]
    assert DataConfig.from_dict(version_2).calib_rule == "tenth"
    assert DataConfig().to_dict()["version"] == 3 and DataConfig().calib_rule == "sixth"
    with pytest.raises(ConfigError, match="num_workers must be an int >= 0"):
        DataConfig(num_workers=-1)


def test_crop_scale_sets_the_training_crops_and_is_refused_for_in_memory_data(tmp_path):
    from rdn.config import ConfigError
    from rdn.errors import DataError
    from rdn.steps import DataConfig, load_data

    write_folder(tmp_path)
    data = load_data(DataConfig(dataset="imagefolder", image_size=16, crop_scale=0.35, calib_size=1), tmp_path, 0)
    assert data.train.transform.scale == (0.35, 1.0)
    with pytest.raises(DataError, match="crop_scale applies to the imagefolder data only"):
        load_data(DataConfig(dataset="synthetic", crop_scale=0.35), None, 0)
    with pytest.raises(ConfigError, match=r"crop_scale must be a number in \(0, 1\]"):
        DataConfig(crop_scale=0)


def write_noise_folder(root, images_per_class: int = 4) -> None:
    """root/{train,val}/{cat,dog}/<i>.png of random pixels (a crop or a flip changes them, unlike one colour)."""
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for index in range(images_per_class):
                pixels = torch.randint(0, 256, (48, 40, 3), dtype=torch.uint8, generator=generator).numpy()
                Image.fromarray(pixels).save(root / split / name / f"{index}.png")


def _batches(loader, epoch: int) -> list[torch.Tensor]:
    loader.sampler.set_epoch(epoch)  # what fit does before every epoch
    return [images for images, _ in loader]


def test_augmentation_depends_on_seed_and_epoch_not_on_the_workers(tmp_path):
    """Every sample's crop and flip are drawn from its own seed (SeededSampler): 0 or 2 worker processes give
    the same batches, an epoch drawn again gives the same batches (an exact resume), another epoch others."""
    write_noise_folder(tmp_path)
    loaders = {workers: image_folder_loaders(tmp_path, batch_size=4, image_size=16, workers=workers, seed=3)[0]
               for workers in (0, 2)}  # fmt: skip
    first = _batches(loaders[0], epoch=1)
    assert len(first) == 2
    for one, other in zip(first, _batches(loaders[2], epoch=1), strict=True):
        assert torch.equal(one, other)
    for one, again in zip(first, _batches(loaders[0], epoch=1), strict=True):
        assert torch.equal(one, again)
    assert not torch.equal(torch.cat(first).sort(0).values, torch.cat(_batches(loaders[0], epoch=2)).sort(0).values)


def test_samples_are_stored_without_a_python_object_per_file(tmp_path):
    """Samples: paths as one numpy byte array, labels as int32; indexing, slicing, take and equality as a list."""
    from rdn.data.folder import Samples

    write_folder(tmp_path)
    samples = ImageFolder(tmp_path / "train").samples
    assert isinstance(samples, Samples) and samples.paths.dtype.kind == "S" and samples.labels.dtype == "int32"
    pairs = list(samples)
    assert pairs[0] == (tmp_path / "train" / "cat" / "0.jpg", 0) and pairs[-1][1] == 1 and len(pairs) == 6
    assert list(samples[1:3]) == pairs[1:3] and list(samples.take([5, 0])) == [pairs[5], pairs[0]]
    assert samples.take(range(6)) == samples and samples.take([1, 0]) != samples.take([0, 1])


def _fit_folder(root, out, workers: int, stop_at: int | None = None, resume: bool = False):
    train, val = image_folder_loaders(root, batch_size=2, image_size=16, workers=workers, seed=5)
    torch.manual_seed(11 if resume else 0)  # a resumed run must not depend on the fresh model's init
    model = TinyNet(num_classes=2)
    model.stem = torch.nn.Conv2d(3, 8, 3, padding=1)

    def stop(info):
        if info.step == stop_at:
            raise KeyboardInterrupt(f"killed at step {info.step}")

    config = TrainConfig(epochs=2, batch_size=2, lr=0.1, warmup_epochs=0, progress=False, ema_decay=None,
                         checkpoint_every=2, seed=3)  # fmt: skip
    return fit(model, train, config, eval_data=val, out=out, resume=resume, callbacks=[stop] if stop_at else [])


def test_a_folder_run_killed_mid_epoch_resumes_bit_exact_with_another_worker_count(tmp_path):
    """Streamed folder, killed in epoch 2 with two workers, resumed in-process: the weights are those of
    an uninterrupted run (the augmentation follows (seed, epoch, position), not the workers)."""
    write_noise_folder(tmp_path / "data")
    uninterrupted = _fit_folder(tmp_path / "data", tmp_path / "a", workers=0)
    with pytest.raises(KeyboardInterrupt):
        _fit_folder(tmp_path / "data", tmp_path / "b", workers=2, stop_at=7)  # 4 steps per epoch; checkpoint at 6
    resumed = _fit_folder(tmp_path / "data", tmp_path / "b", workers=0, resume=True)
    assert resumed.steps == uninterrupted.steps == 8
    for key, value in uninterrupted.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
