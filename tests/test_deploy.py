"""``rdn infer`` / ``rdn export`` (rdn.deploy) on a tiny synthetic run: predictions checked against
the network run by hand on independently preprocessed images; exports against the network."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from rdn.cli import main
from rdn.data import load_dataset
from rdn.inference import dynamic_forward
from rdn.policy import ExitPolicy
from rdn.train import load_model

TRAIN = ["--data", "synthetic", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16",
         "--eval-batch-size", "64", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A fine-tuned RDN (K = 3) of a tiny MobileNetV2 on synthetic 16 × 16 grey images, made by the CLI."""
    root = tmp_path_factory.mktemp("deploy")
    base = ["pretrain", "--model", "mobilenet_v2", "--width-mult", "0.1"]
    assert main([*base, *TRAIN, "--out", str(root / "base")]) == 0
    assert main(["nest", "--from", str(root / "base"), "--k", "2", "--data", "synthetic", "--calib-samples", "16",
                 "--no-eval", "--out", str(root / "rdn")]) == 0  # fmt: skip
    assert main(["finetune", "--from", str(root / "rdn"), *TRAIN, "--out", str(root / "ft")]) == 0
    return root / "ft"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Five synthetic test images as grey PNGs and one of them as a 20 × 20 RGB PNG in a sub-folder
    (converted to grey and resized by the decoder); returns the folder."""
    folder = tmp_path_factory.mktemp("images")
    test = load_dataset("synthetic").test
    for index in range(5):
        Image.fromarray(test.images[index, 0].numpy()).save(folder / f"grey{index}.png")
    rgb = Image.fromarray(test.images[0, 0].numpy()).convert("RGB").resize((20, 20), Image.BILINEAR)
    (folder / "nested").mkdir()
    rgb.save(folder / "nested" / "rgb.png")
    return folder


def expected_inputs(files, run) -> torch.Tensor:
    """The images as the model takes them, preprocessed here with Pillow and the run's recorded spec."""
    spec = json.loads((run / "summary.json").read_text())["data_spec"]
    size = spec["image_size"]
    arrays = []
    for path in files:
        image = Image.open(path).convert("L")
        image = image if image.size == (size, size) else image.resize((size, size), Image.BILINEAR)
        arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(arrays))[:, None]
    return (x - spec["mean"][0]) / spec["std"][0]


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_infer_with_a_static_subnet(run, images, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    assert main(["infer", str(images), "--from", str(run), "--subnet", "2", "--out", str(out)]) == 0
    rows = read_csv(out)
    files = sorted(p for p in images.rglob("*.png"))
    assert [row["file"] for row in rows] == [str(p) for p in files]
    net = load_model(run / "checkpoint.pt", use_ema=True)
    with torch.no_grad():
        probabilities = torch.softmax(net(expected_inputs(files, run), subnet=2), dim=1)
    assert [int(row["label"]) for row in rows] == probabilities.argmax(1).tolist()
    assert [float(row["probability"]) for row in rows] == pytest.approx(probabilities.max(1).values.tolist(), abs=1e-5)
    assert {row["exit"] for row in rows} == {"2"} and {float(row["macs"]) for row in rows} == {float(net.macs(2))}
    assert all(row["class_name"] == str(row["label"]) for row in rows)  # synthetic classes are named 0..9
    assert "6 images, static N_2" in capsys.readouterr().err

    # CSV on stdout without --out.
    assert main(["infer", str(images / "grey0.png"), "--from", str(run), "--subnet", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "file,label,class_name,probability,exit,macs" and len(lines) == 2


def test_infer_with_an_early_exit_policy(run, images, tmp_path, capsys):
    net = load_model(run / "checkpoint.pt", use_ema=True)
    torch.manual_seed(0)
    policy = ExitPolicy.for_network(net).eval()
    policy.lambdas = {0.1: 0.05, 0.25: None}
    policy_dir = tmp_path / "policy"
    policy_dir.mkdir()
    torch.save(policy.state_dict(), policy_dir / "policy.pt")
    (policy_dir / "calibration.json").write_text(json.dumps({"operating_epsilon": 0.1}))

    out = tmp_path / "predictions.json"
    assert main(["infer", str(images), "--from", str(run), "--policy", str(policy_dir), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    files = sorted(p for p in images.rglob("*.png"))
    with torch.no_grad():
        expected = dynamic_forward(net, policy, expected_inputs(files, run), 0.05)
    assert [row["exit"] for row in rows] == expected.exits.tolist()
    assert [row["label"] for row in rows] == expected.logits.argmax(1).tolist()
    # Sequential policy, every exit allowed: it runs at N_1 .. N_exit, one MLP evaluation each.
    policy_macs = policy.macs()
    assert [row["macs"] for row in rows] == [net.macs(e) + e * policy_macs for e in expected.exits.tolist()]
    assert "early exits at ε = 0.1" in capsys.readouterr().err
    # The speed options change how it runs, not what it predicts.
    for walk in ("jump", "recompute"):
        fast = tmp_path / f"fast_{walk}.json"
        assert main(["infer", str(images), "--from", str(run), "--policy", str(policy_dir), "--out", str(fast),
                     "--walk", walk, "--fold-batch-norms", "--channels-last"]) == 0  # fmt: skip
        assert [(r["exit"], r["label"], r["macs"]) for r in json.loads(fast.read_text())] == \
            [(r["exit"], r["label"], r["macs"]) for r in rows], walk  # fmt: skip

    # The other calibrated ε (its λ* fell back to N_K: every image leaves at N_K), then refusals.
    assert main(["infer", str(images), "--from", str(run), "--policy", str(policy_dir / "policy.pt"),
                 "--epsilon", "0.25", "--out", str(out)]) == 0  # fmt: skip
    assert {row["exit"] for row in json.loads(out.read_text())} == {net.num_subnets}
    assert main(["infer", str(images), "--from", str(run), "--policy", str(policy_dir), "--epsilon", "0.3"]) == 2
    error = capsys.readouterr().err
    assert "ε = 0.3 was not calibrated" in error and "calibrated: 0.1, 0.25" in error
    assert main(["infer", str(images), "--from", str(run), "--policy", str(policy_dir), "--subnet", "1"]) == 2
    assert "give one of them" in capsys.readouterr().err

    # A run with a risk-controlled calibration: its certified λ is the default, stated with its guarantee.
    guarantee = "with probability >= 0.9 ... <= 0.05"
    for certified, exits in ((0.05, expected.exits.tolist()), (None, [net.num_subnets] * len(files))):
        (policy_dir / "calibration.json").write_text(json.dumps({"operating_epsilon": 0.25, "risk_control": {
            "policy": {"parameter": certified, "guarantee": guarantee}}}))  # fmt: skip
        assert main(["infer", str(images), "--from", str(run), "--policy", str(policy_dir), "--out", str(out)]) == 0
        rows = json.loads(out.read_text())
        assert [row["exit"] for row in rows] == exits and "risk-controlled" in capsys.readouterr().err
        if certified is None:  # always N_K runs static N_K: no policy MACs
            assert {row["macs"] for row in rows} == {net.macs(net.num_subnets)}


def test_infer_refusals(run, images, tmp_path, capsys, monkeypatch):
    assert main(["infer", str(images), "--from", str(run)]) == 2  # a finetune run has no policy
    assert "has no early-exit policy" in capsys.readouterr().err
    assert main(["infer", str(images), "--from", str(run), "--subnet", "4"]) == 2
    assert "subnet must be one of 1..3" in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["infer", str(empty), "--from", str(run), "--subnet", "1"]) == 2
    assert "no image files" in capsys.readouterr().err
    (empty / "broken.png").write_text("not an image")
    assert main(["infer", str(empty), "--from", str(run), "--subnet", "1"]) == 2
    assert "broken.png cannot be decoded as an image" in capsys.readouterr().err

    # A run that does not record its input spec (older runs) needs --data.
    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / "summary.json").unlink()
    assert main(["infer", str(images), "--from", str(old), "--subnet", "1"]) == 2
    assert "--data NAME" in capsys.readouterr().err
    assert main(["infer", str(images), "--from", str(old), "--subnet", "1", "--data", "synthetic"]) == 0
    capsys.readouterr()


def test_export_a_subnet(run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", "--from", str(run), "--subnet", "2", "--out", str(out)]) == 0
    net = load_model(run / "checkpoint.pt", use_ema=True)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        expected = net(x, subnet=2)
        scripted = torch.jit.load(str(out / "model.torchscript.pt"))
        assert torch.allclose(scripted(x), expected, atol=1e-5)  # any batch size, though traced on one image
        module = net.export(2).eval()
        module.load_state_dict(torch.load(out / "state_dict.pt", weights_only=True))
        assert torch.allclose(module(x), expected, atol=1e-5)
        program = torch.export.load(out / "model.pt2").module()
        assert torch.allclose(program(x), expected, atol=1e-5)
    description = json.loads((out / "export.json").read_text())
    assert description["macs"] == net.macs(2) and description["params"] == net.params(2)
    assert description["input_shape"] == ["batch", 1, 16, 16] and len(description["classes"]) == 10
    onnx_installed = importlib.util.find_spec("onnx") is not None
    assert (out / "model.onnx").exists() == onnx_installed
    capsys.readouterr()

    assert main(["export", "--from", str(run), "--subnet", "1", "--out", str(out)]) == 2  # would replace an export
    assert "already holds a run (an export)" in capsys.readouterr().err
    assert main(["export", "--from", str(run), "--subnet", "1", "--out", str(out), "--overwrite",
                 "--format", "torchscript"]) == 0  # fmt: skip
    assert json.loads((out / "export.json").read_text())["subnet"] == 1 and not (out / "state_dict.pt").exists()
    if not onnx_installed:
        assert main(["export", "--from", str(run), "--subnet", "1", "--out", str(tmp_path / "o"),
                     "--format", "onnx"]) == 2  # fmt: skip
        assert "needs the onnx package" in capsys.readouterr().err


def test_calibrate_writes_a_model_that_infer_runs(run, images, tmp_path, capsys):
    model = tmp_path / "model.rdn.pt"
    command = ["calibrate", "--from", str(run), "--data", "synthetic", "--tolerance", "0.2", "--policy-samples", "200",
               "--policy-epochs", "2", "--no-progress", "--out", str(model)]  # fmt: skip
    assert main(command) == 0
    error = capsys.readouterr().err
    assert "calibration images" in error and "with probability >= 0.9" in error
    assert main(["infer", str(images), "--from", str(model)]) == 0
    assert "risk-controlled" in capsys.readouterr().err
    # The file is not replaced without --overwrite; bad values are one-line errors.
    assert main(command) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*command[:-2], "--tolerance", "1.5", "--overwrite", "--out", str(model)]) == 2
    assert "delta" in capsys.readouterr().err
    assert main([*command, "--overwrite", "--policy-samples", "0"]) == 2
    assert "--policy-samples must be a positive int" in capsys.readouterr().err


def test_decoding_follows_the_evaluation_of_the_run(tmp_path):
    """A streamed image folder's run evaluated on centre crops: infer decodes the same way. An
    in-memory dataset's run saw whole images resized: infer resizes whole images."""


    from rdn.data import DataSpec
    from rdn.data.folder import EvalTransform
    from rdn.deploy import decode_images

    pixels = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    path = tmp_path / "wide.png"
    Image.fromarray(pixels).save(path)
    spec = DataSpec("imagefolder", ("a", "b"), 3, 16, (0.5,) * 3, (0.25,) * 3, crop_padding=0, flip=True)
    cropped = decode_images([path], spec)[0]
    expected = np.asarray(EvalTransform(16).crop(Image.fromarray(pixels)))
    assert torch.equal(cropped, torch.from_numpy(expected.copy()).permute(2, 0, 1))
    whole = decode_images([path], dataclasses.replace(spec, name="cifar10"))[0]
    resized = np.asarray(Image.fromarray(pixels).resize((16, 16), Image.BILINEAR))
    assert torch.equal(whole, torch.from_numpy(resized.copy()).permute(2, 0, 1))
    assert not torch.equal(cropped, whole)


def test_reuse_freed_memory_applies_on_glibc_and_says_when_it_cannot(monkeypatch):
    import ctypes
    import platform

    import rdn.deploy as deploy

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert deploy.reuse_freed_memory() is True

    class NoMallopt:  # a C library without mallopt (musl, macOS)
        def __init__(self, name):
            pass

    monkeypatch.setattr(ctypes, "CDLL", NoMallopt)
    assert deploy.reuse_freed_memory() is False

    class Refusing:  # mallopt returns 0 when it rejects a value
        def __init__(self, name):
            self.mallopt = lambda parameter, value: 0

    monkeypatch.setattr(ctypes, "CDLL", Refusing)
    assert deploy.reuse_freed_memory() is False


@pytest.mark.parametrize("flag, calls", [([], 1), (["--no-reuse-freed-memory"], 0)])
def test_infer_reuses_freed_memory_unless_told_not_to(run, images, monkeypatch, capsys, flag, calls):
    import rdn.deploy as deploy

    recorded = []
    monkeypatch.setattr(deploy, "reuse_freed_memory", lambda: recorded.append(True) or True)
    assert main(["infer", str(images / "grey0.png"), "--from", str(run), "--subnet", "1", *flag]) == 0
    assert len(recorded) == calls


def test_the_walks_rdn_infer_offers_are_the_engines():
    """The CLI spells its --walk choices out (no torch import to build the parser): they must stay
    the engine's strategies."""
    from rdn.cli import build_parser
    from rdn.inference import STRATEGIES

    for strategy in STRATEGIES:
        assert build_parser().parse_args(["infer", "x.png", "--from", "run", "--walk", strategy]).walk == strategy
    with pytest.raises(SystemExit):
        build_parser().parse_args(["infer", "x.png", "--from", "run", "--walk", "fastest"])
