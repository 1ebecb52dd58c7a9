"""The command line on a streamed image folder (--data imagefolder): pretrain → nest → finetune → infer,
the pipeline, the refusals, and that the folder is streamed (decoded batch by batch, never loaded whole)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

import rdn.data
import rdn.data.folder
from rdn.cli import main

COLOURS = {"a_red": (200, 40, 40), "b_green": (40, 200, 40), "c_blue": (40, 40, 200)}
COMMON = ["--data", "imagefolder", "--image-size", "16", "--threads", "1"]


def write_jpeg_folder(root, train: int = 8, val: int = 2, grey: bool = False, classes=COLOURS) -> None:
    """root/{train,val}/<class>/<i>.jpg: noisy images of 20–28 pixels whose colour tells the class."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                side = 20 + 4 * (index % 3)
                pixels = np.clip(np.array(COLOURS.get(name, (128, 128, 128))) + rng.normal(0, 20, (side, side, 3)),
                                 0, 255).astype(np.uint8)  # fmt: skip
                image = Image.fromarray(pixels)
                (image.convert("L") if grey else image).save(folder / f"{index}.jpg", quality=90)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    write_jpeg_folder(root)
    return root


def run(argv, capsys) -> tuple[int, str]:
    status = main([str(item) for item in argv])
    return status, capsys.readouterr().err


def test_pretrain_nest_finetune_infer_from_a_folder(folder, tmp_path, capsys):
    data = [*COMMON, "--data-root", folder]
    train = ["--epochs", "1", "--batch-size", "8", "--no-progress", "--warmup-epochs", "0"]
    status, err = run(["pretrain", "--model", "mobilenet_v2", "--width-mult", "0.25", *data, *train,
                       "--num-workers", "2", "--out", tmp_path / "base"], capsys)  # fmt: skip
    assert status == 0, err
    summary = json.loads((tmp_path / "base" / "summary.json").read_text())
    assert summary["data_spec"] == {"name": "imagefolder", "classes": list(COLOURS), "in_chans": 3, "image_size": 16,
                                    "mean": list(rdn.data.folder.IMAGENET_MEAN),
                                    "std": list(rdn.data.folder.IMAGENET_STD), "crop_padding": 0, "flip": True}
    assert "(streamed from disk): 20 train / 4 calib / 6 val" in summary["data"]
    assert summary["steps"] == 2  # 22 training images, batches of 8, the last incomplete one dropped
    status, err = run(["nest", "--from", tmp_path / "base", "--k", "2", "--calib-samples", "2", "--recalibrate-bn", "1",
                       *data, "--out", tmp_path / "nest"], capsys)  # fmt: skip
    assert status == 0, err
    nested = json.loads((tmp_path / "nest" / "summary.json").read_text())
    assert nested["data_spec"]["name"] == "imagefolder" and len(nested["rdn_test_top1"]) == 3
    status, err = run(["finetune", "--from", tmp_path / "nest", *data, *train, "--out", tmp_path / "finetune"],
                      capsys)  # fmt: skip
    assert status == 0, err
    # rdn infer reads the input spec from the run: no --data needed.
    status, err = run(["infer", folder / "val", "--from", tmp_path / "finetune", "--subnet", "2", "--out",
                       tmp_path / "predictions.csv"], capsys)  # fmt: skip
    assert status == 0, err
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert len(rows) == 6 and {row["class_name"] for row in rows} <= set(COLOURS)
    assert {row["exit"] for row in rows} == {"2"}


def test_the_folder_is_streamed_never_loaded_whole(folder, tmp_path, capsys, monkeypatch):
    """The in-memory loaders are never called; training decodes one batch per step and the
    evaluation split once per evaluation; the surgery decodes only its calibration images."""

    def refuse(*args, **kwargs):
        raise AssertionError("the in-memory loader was called for a streamed folder")

    monkeypatch.setattr(rdn.data, "load_dataset", refuse)
    monkeypatch.setattr(rdn.data, "_read_folder", refuse)
    decoded = []
    original = rdn.data.folder.decode_image
    monkeypatch.setattr(rdn.data.folder, "decode_image", lambda path, mode="RGB": decoded.append(path) or
                        original(path, mode))  # fmt: skip
    data = [*COMMON, "--data-root", folder]
    status, err = run(["pretrain", "--model", "mobilenet_v2", "--width-mult", "0.25", *data, "--epochs", "1",
                       "--batch-size", "4", "--steps-per-epoch", "1", "--no-progress", "--out", tmp_path / "base"],
                      capsys)  # fmt: skip
    assert status == 0, err
    # With 0 workers nothing is prefetched: the one training batch of 4, and the 6 val images (evaluated
    # with the raw and the EMA weights).
    val = {str(path) for path in (folder / "val").rglob("*.jpg")}
    training = [path for path in decoded if str(path) not in val]
    assert len(training) == 4, training
    assert {str(path) for path in decoded} - {str(path) for path in training} == val
    decoded.clear()
    status, err = run(["nest", "--from", tmp_path / "base", "--k", "2", "--calib-samples", "2", "--no-eval", *data,
                       "--out", tmp_path / "nest"], capsys)  # fmt: skip
    assert status == 0, err
    assert len(decoded) == 2  # the calibration images only


def test_pipeline_on_a_folder_then_infer_with_its_early_exits(folder, tmp_path, capsys):
    out = tmp_path / "run"
    status, err = run(["pipeline", "--quick", *COMMON, "--data-root", folder, "--k", "2", "--calib-size", "4",
                       "--batch-size", "8", "--num-workers", "1", "--no-progress", "--out", out], capsys)  # fmt: skip
    assert status == 0, err
    settings = json.loads((out / "settings.json").read_text())
    assert settings["data"]["dataset"] == "imagefolder" and settings["data"]["num_workers"] == 1
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["data"].startswith(f"imagefolder {folder} (streamed from disk): 20 train / 4 calib / 6 val")
    assert json.loads((out / "finetune" / "summary.json").read_text())["data_spec"]["name"] == "imagefolder"
    status, err = run(["infer", folder / "val", "--from", out, "--out", tmp_path / "predictions.json"], capsys)
    assert status == 0, err
    assert len(json.loads((tmp_path / "predictions.json").read_text())) == 6 and "early exits" in err


def _layout(tmp_path, name):
    root = tmp_path / name
    write_jpeg_folder(root, train=2, val=1)
    return root


@pytest.mark.parametrize("case, expected", [
    ("no root", "needs --data-root PATH"),
    ("missing", "--data-root .*missing: no such folder"),
    ("no train", "no train/ folder"),
    ("no val", "no val/ folder"),
    ("no classes", "train/ has no class sub-folders"),
    ("class mismatch", r"the classes of train/ and val/ differ \(only in train/: \['c_blue'\]; only in val/: "
                       r"\['d_grey'\]\)"),
    ("empty class", r"val/ classes without images: \['b_green'\]"),
    ("unreadable first image", "cannot decode image .*a_red/0.jpg"),
])  # fmt: skip
def test_bad_folders_are_refused_naming_the_argument(tmp_path, capsys, case, expected):
    root = _layout(tmp_path, "images")
    if case == "missing":
        root = tmp_path / "missing"
    elif case == "no train":
        (root / "train").rename(tmp_path / "elsewhere")
    elif case == "no val":
        (root / "val").rename(tmp_path / "elsewhere")
    elif case == "no classes":
        for path in sorted((root / "train").rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
    elif case == "class mismatch":
        (root / "val" / "c_blue").rename(root / "val" / "d_grey")
    elif case == "empty class":
        for path in (root / "val" / "b_green").iterdir():
            path.unlink()
    elif case == "unreadable first image":
        (root / "train" / "a_red" / "0.jpg").write_bytes(b"not a jpeg")
    where = [] if case == "no root" else ["--data-root", root]
    status, err = run(["pretrain", "--model", "mobilenet_v2", *COMMON, *where, "--out", tmp_path / "run"], capsys)
    assert status == 2, err
    assert err.startswith("rdn pretrain: error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    import re

    assert re.search(expected, err), err


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_met_in_training_is_named(tmp_path, capsys, workers):
    root = _layout(tmp_path, "images")
    (root / "train" / "b_green" / "1.jpg").write_bytes(b"\xff\xd8 truncated")  # not the first: found when loaded
    status, err = run(["pretrain", "--model", "mobilenet_v2", "--width-mult", "0.25", *COMMON, "--data-root", root,
                       "--calib-size", "1", "--batch-size", "5", "--epochs", "1", "--num-workers", workers,
                       "--no-progress", "--out", tmp_path / "run"], capsys)  # fmt: skip
    assert status == 2, err
    assert "cannot decode image" in err and "b_green/1.jpg" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_num_workers_must_be_a_count(folder, tmp_path, capsys):
    status, err = run(["nest", "--model", "mobilenet_v2", *COMMON, "--data-root", folder, "--num-workers", "-1",
                       "--out", tmp_path / "run"], capsys)  # fmt: skip
    assert status == 2 and "num_workers must be an int >= 0, got -1" in err


def test_grey_folders_give_one_channel_runs(tmp_path, capsys):
    root = tmp_path / "grey"
    write_jpeg_folder(root, train=4, val=1, grey=True)
    status, err = run(["pretrain", "--model", "mobilenet_v2", "--width-mult", "0.25", *COMMON, "--data-root", root,
                       "--calib-size", "2", "--epochs", "1", "--batch-size", "5", "--no-progress", "--out",
                       tmp_path / "run"], capsys)  # fmt: skip
    assert status == 0, err
    spec = json.loads((tmp_path / "run" / "summary.json").read_text())["data_spec"]
    assert spec["in_chans"] == 1 and spec["mean"] == list(rdn.data.folder.GREY_MEAN)


@pytest.mark.skipif(not (rdn.data.FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists()
                    and not (rdn.data.FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte").exists(),
                    reason="Fashion-MNIST (dataset-fashion-mnist) not installed")  # fmt: skip
def test_make_image_folder_writes_fashion_mnist_in_the_imagenet_layout(tmp_path, capsys):
    from tools.make_image_folder import class_folder_names
    from tools.make_image_folder import main as make

    assert make(["--out", str(tmp_path / "f"), "--per-class", "2", "--val-per-class", "1", "--size", "32"]) == 0
    assert sorted(p.name for p in (tmp_path / "f" / "train").iterdir()) == class_folder_names()
    files = sorted((tmp_path / "f" / "train").rglob("*.jpg"))
    assert len(files) == 20 and len(list((tmp_path / "f" / "val").rglob("*.jpg"))) == 10
    with Image.open(files[0]) as image:
        assert image.size == (32, 32) and image.mode == "RGB" and image.format == "JPEG"
    assert make(["--out", str(tmp_path / "f"), "--per-class", "2"]) == 2  # never mixes two folders
    assert "exists and is not empty" in capsys.readouterr().err
    assert make(["--out", str(tmp_path / "g"), "--per-class", "1", "--val-per-class", "1", "--grey"]) == 0
    with Image.open(next((tmp_path / "g" / "val").rglob("*.jpg"))) as image:
        assert image.mode == "L" and image.size == (64, 64)
