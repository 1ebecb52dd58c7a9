"""rdn.data: file formats on tiny files written here, real datasets when installed, splits, augmentation, loaders."""

from __future__ import annotations

import dataclasses
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from rdn.data import (
    FASHION_MNIST_DIR,
    BatchTransform,
    default_calib_size,
    eval_loader,
    load_dataset,
    read_idx,
    train_loader,
)


def write_idx(path, array: np.ndarray, gz: bool) -> None:
    payload = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(payload)


def write_idx_dataset(root, gz: bool, train: int = 30, test: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = np.arange(count) % 10
        suffix = ".gz" if gz else ""
        write_idx(root / f"{split}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", labels, gz)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_read_back(tmp_path, gz):
    arrays = write_idx_dataset(tmp_path, gz)
    assert np.array_equal(read_idx(tmp_path / f"train-images-idx3-ubyte{'.gz' if gz else ''}"), arrays["train"][0])
    splits = load_dataset("fashion_mnist", tmp_path, calib_size=5)
    assert (len(splits.train), len(splits.calib), len(splits.test)) == (25, 5, 10)
    assert torch.equal(splits.test.images[:, 0], torch.from_numpy(arrays["t10k"][0]))
    assert torch.equal(splits.test.labels, torch.from_numpy(arrays["t10k"][1]).long())
    # train + calib are the official training images, split without loss or duplication.
    together = torch.cat([splits.train.images, splits.calib.images]).flatten(1)
    expected = torch.from_numpy(arrays["train"][0]).flatten(1)
    assert sorted(map(bytes, together.numpy())) == sorted(map(bytes, expected.numpy()))


def test_idx_bad_header(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="unsigned-byte IDX"):
        read_idx(tmp_path / "bad")


def test_missing_files_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*--data-root"):
        load_dataset("fashion_mnist", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("fashion_mnist", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="data_batch_1..5"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(ValueError, match="pass root"):
        load_dataset("cifar10")


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*fashion_mnist"):
        load_dataset("imagenet")


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="apt package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    splits = load_dataset("fashion_mnist")
    assert (len(splits.train), len(splits.calib), len(splits.test)) == (50000, 10000, 10000)
    older = load_dataset("fashion_mnist", calib_rule="tenth")  # what runs of DataConfig v2 held out
    assert (len(older.train), len(older.calib)) == (55000, 5000)
    assert splits.train.images.shape[1:] == (1, 28, 28)
    counts = torch.bincount(torch.cat([splits.train.labels, splits.calib.labels]), minlength=10)
    assert counts.tolist() == [6000] * 10  # the official, balanced training set
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10
    mean = torch.cat([splits.train.images, splits.calib.images]).double().mean() / 255
    assert abs(mean.item() - splits.spec.mean[0]) < 1e-3


def test_default_calib_size_rules():
    assert [default_calib_size(n) for n in (1, 12, 6000, 60000, 1_281_167)] == [1, 2, 1000, 10000, 10000]
    assert [default_calib_size(n, "tenth") for n in (1, 4000, 55000, 1_281_167)] == [1, 400, 5000, 5000]
    with pytest.raises(ValueError, match="calib_rule must be one of"):
        default_calib_size(100, "half")


def test_real_mnist5k():
    try:
        splits = load_dataset("mnist5k")
    except FileNotFoundError as error:
        pytest.skip(str(error))
    assert len(splits.train) + len(splits.calib) + len(splits.test) == 5000
    assert set(torch.cat([splits.train.labels, splits.test.labels]).tolist()) == set(range(10))
    assert splits.train.images.max() == 255 and splits.spec.flip is False  # digits are not flipped


def test_mnist5k_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="mnist_5k.csv.gz"):
        load_dataset("mnist5k", tmp_path)


def _cifar_batch(path, images: np.ndarray, labels: list[int]) -> None:
    with open(path, "wb") as handle:
        pickle.dump({b"data": images.reshape(len(images), -1), b"labels": labels, b"batch_label": b"x"}, handle)


def test_cifar10_pickles(tmp_path):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (12, 3, 32, 32), dtype=np.uint8)
    test = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    _cifar_batch(tmp_path / "data_batch_1", train[:6], [0, 1, 2, 3, 4, 5])
    _cifar_batch(tmp_path / "data_batch_2", train[6:], [6, 7, 8, 9, 0, 1])
    _cifar_batch(tmp_path / "test_batch", test, [9, 8, 7, 6])
    splits = load_dataset("cifar10", tmp_path, calib_size=2)
    assert torch.equal(splits.test.images, torch.from_numpy(test))  # rows are R plane, G plane, B plane
    assert splits.test.labels.tolist() == [9, 8, 7, 6]
    assert len(splits.train) + len(splits.calib) == 12 and splits.spec.flip and splits.spec.crop_padding == 4


def test_cifar10_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for name in ("data_batch_1", "test_batch"):
        with open(tmp_path / name, "wb") as handle:
            pickle.dump({b"data": Evil(), b"labels": [0]}, handle)
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        load_dataset("cifar10", tmp_path)


def _write_images(folder, count: int, size: int, value: int, mode: str = "RGB"):
    from PIL import Image

    folder.mkdir(parents=True)
    for index in range(count):
        Image.new(mode, (size, size), (value, index, 0) if mode == "RGB" else value).save(folder / f"{index}.png")


def test_image_folder_one_tree_is_split(tmp_path):
    _write_images(tmp_path / "cat", 6, 20, 10)
    _write_images(tmp_path / "dog", 6, 24, 200)  # another size: resized to the first image's
    splits = load_dataset("folder", tmp_path, test_size=4, calib_size=2)
    assert splits.spec.classes == ("cat", "dog") and splits.spec.in_chans == 3 and splits.spec.image_size == 20
    assert (len(splits.train), len(splits.calib), len(splits.test)) == (6, 2, 4)
    for dataset in (splits.train, splits.test):
        red = dataset.images[:, 0, 0, 0]
        assert torch.equal(red > 100, dataset.labels == 1)  # each image kept its class


def test_image_folder_train_test_grey(tmp_path):
    _write_images(tmp_path / "train" / "a", 4, 16, 30, mode="L")
    _write_images(tmp_path / "train" / "b", 4, 16, 220, mode="L")
    _write_images(tmp_path / "test" / "a", 2, 16, 30, mode="L")
    _write_images(tmp_path / "test" / "b", 1, 16, 220, mode="L")
    splits = load_dataset("folder", tmp_path, calib_size=1, image_size=16)
    assert splits.spec.in_chans == 1 and len(splits.test) == 3 and splits.test.labels.tolist() == [0, 0, 1]
    assert splits.test.images.shape == (3, 1, 16, 16)


def test_image_folder_without_images(tmp_path):
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        load_dataset("folder", tmp_path)


def test_splits_are_deterministic_and_disjoint():
    first, again, other = (load_dataset("synthetic", seed=s, num_samples=200) for s in (0, 0, 1))
    assert torch.equal(first.train.images, again.train.images) and torch.equal(first.test.labels, again.test.labels)
    assert not torch.equal(first.train.images, other.train.images)
    rows = [bytes(r) for split in (first.train, first.calib, first.test) for r in split.images.flatten(1).numpy()]
    assert len(rows) == 200
    with pytest.raises(ValueError, match="calib_size"):
        load_dataset("synthetic", calib_size=10_000)


def test_eval_transform_is_normalisation_only():
    splits = load_dataset("synthetic", num_samples=64)
    images = splits.test.images[:8]
    out = BatchTransform(splits.spec, train=False)(images, torch.arange(8), epoch=3)
    expected = (images.float() / 255 - splits.spec.mean[0]) / splits.spec.std[0]
    torch.testing.assert_close(out, expected)


def test_train_augmentation_is_a_keyed_crop_and_flip():
    splits = load_dataset("synthetic", num_samples=64)
    spec = dataclasses.replace(splits.spec, crop_padding=2, flip=True)
    images = splits.train.images[:16]
    keys = torch.arange(100, 116)
    transform = BatchTransform(spec, train=True, seed=5)
    out = transform(images, keys, epoch=0)
    # Keyed on (seed, epoch, sample): the same sample in another batch position gets the same image.
    permuted = transform(images.flip(0), keys.flip(0), epoch=0)
    assert torch.equal(permuted.flip(0), out)
    assert not torch.equal(transform(images, keys, epoch=1), out)
    # Every output is a flipped-or-not crop of the zero-padded image.
    raw = out * spec.std[0] + spec.mean[0]
    padded = torch.nn.functional.pad(images.float() / 255, (2, 2, 2, 2))
    for n in range(len(images)):
        crops = [padded[n, :, y : y + 16, x : x + 16] for y in range(5) for x in range(5)]
        crops += [c.flip(-1) for c in crops]
        assert min((c - raw[n]).abs().max().item() for c in crops) < 1e-5
    changed = (raw - images.float() / 255).abs().flatten(1).max(1).values > 1e-5
    assert changed.any()


def test_train_loader_batches_resume_and_shards():
    splits = load_dataset("synthetic", num_samples=200)
    dataset = splits.train
    full = [indices.tolist() for _, _, indices in train_loader(dataset, 16, seed=3, epoch=2)]
    assert len(full) == len(dataset) // 16 and all(len(b) == 16 for b in full)
    assert len({i for b in full for i in b}) == 16 * len(full)
    resumed = [indices.tolist() for _, _, indices in train_loader(dataset, 16, seed=3, epoch=2, skip_batches=3)]
    assert resumed == full[3:]
    next_epoch = [indices.tolist() for _, _, indices in train_loader(dataset, 16, seed=3, epoch=3)]
    assert next_epoch != full
    # Two processes with half batches together see every global batch of one process.
    shards = [[indices.tolist() for _, _, indices in train_loader(dataset, 8, seed=3, epoch=2, rank=r, world_size=2)]
              for r in range(2)]  # fmt: skip
    for step, batch in enumerate(full[: len(shards[0])]):
        assert sorted(shards[0][step] + shards[1][step]) == sorted(batch)


def test_batch_larger_than_data():
    dataset = load_dataset("synthetic", num_samples=64).train
    with pytest.raises(ValueError, match="batch_size 1000 .* larger than"):
        train_loader(dataset, 1000)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        eval_loader(dataset, 0)


def test_eval_loader_covers_every_sample_once_over_ranks():
    dataset = load_dataset("synthetic", num_samples=70).test
    seen = [i for r in range(3) for _, _, idx in eval_loader(dataset, 4, rank=r, world_size=3) for i in idx.tolist()]
    assert sorted(seen) == list(range(len(dataset)))
