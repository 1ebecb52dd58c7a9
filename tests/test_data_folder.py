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
