"""rdn.EarlyExitModel: calibrate, run, save / load as one data-only file, export."""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch

import rdn
from rdn.data import DataSpec
from rdn.early_exit import FORMAT, EarlyExitModel
from rdn.files import UnsafeFileError
from rdn.models import create
from tests.test_policy import one_thread, tiny_rdn  # noqa: F401  (one_thread: an autouse fixture)

SPEC = DataSpec(name="synthetic", classes=tuple(str(i) for i in range(10)), in_chans=1, image_size=28,
                mean=(0.5,), std=(0.25,), crop_padding=0, flip=False)  # fmt: skip


def batches(n: int, seed: int, batch_size: int = 200):
    """Unlabelled images: the second element of a batch is never read."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 28, 28, generator=generator)
    return [(chunk, torch.full((chunk.shape[0],), -1)) for chunk in images.split(batch_size)]


BASE = {"name": "mobilenet_v2", "num_classes": 10, "input_size": 28, "in_chans": 1, "width_mult": 0.25}


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    net = rdn.nest(create(**BASE), k=2, mode="expand", select="greedy", calib=torch.randn(8, 1, 28, 28),
                   base=BASE).eval()  # the record rebuilds it by name  # fmt: skip
    return EarlyExitModel.calibrate(net, batches(2000, seed=1), tolerance=0.2, confidence=0.9, policy_epochs=3,
                                    spec=SPEC)  # fmt: skip


def test_calibrate_certifies_and_runs_real_early_exit(calibrated):
    model = calibrated
    assert rdn.EarlyExitModel is EarlyExitModel
    assert model.risk.n == 1000  # half of the 2000 images train the policy, the other half certify λ
    assert model.lam is not None and model.risk.risk <= 0.2
    assert "<= 0.2" in model.guarantee
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    logits, exits = model(x)
    assert logits.shape == (64, 10) and exits.shape == (64,)
    assert 1 <= int(exits.min()) and int(exits.max()) <= model.net.num_subnets
    with torch.no_grad():
        for exit_ in exits.unique().tolist():  # each row is its own exit's logits
            rows = exits == exit_
            assert torch.allclose(logits[rows], model.net(x[rows], subnet=exit_), atol=1e-5)


def test_the_jump_strategy_gives_the_same_exits(calibrated):
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    staged = calibrated(x)
    jumping = copy.copy(calibrated)
    jumping.strategy = "jump"
    jumped = jumping(x)
    assert calibrated.strategy == "staged" and torch.equal(jumped.exits, staged.exits)
    torch.testing.assert_close(jumped.logits, staged.logits, rtol=1e-4, atol=1e-4)


def test_zero_tolerance_runs_the_last_subnet():
    net = tiny_rdn(k=2)
    model = EarlyExitModel.calibrate(net, batches(400, seed=2), tolerance=0.0, policy_epochs=1)
    assert model.lam is None
    x = torch.randn(8, 1, 28, 28)
    logits, exits = model(x)
    assert torch.equal(exits, torch.full((8,), net.num_subnets))
    with torch.no_grad():
        assert torch.allclose(logits, net(x, subnet=net.num_subnets))


def test_policy_data_leaves_every_calibration_image_to_the_certification():
    model = EarlyExitModel.calibrate(tiny_rdn(k=2), batches(600, seed=3), policy_data=batches(300, seed=4),
                                     tolerance=0.1, policy_epochs=1, exits=[1, 3])  # fmt: skip
    assert model.risk.n == 600
    assert model.policy.allowed.tolist() == [True, False, True]


def test_save_and_load_one_file(calibrated, tmp_path):
    path = calibrated.save(tmp_path / "model.rdn.pt")
    assert sorted(os.listdir(tmp_path)) == ["model.rdn.pt"]  # written atomically: no temporary left
    loaded = EarlyExitModel.load(path)
    assert loaded.risk == calibrated.risk and loaded.spec == calibrated.spec
    x = torch.randn(32, 1, 28, 28)
    for mine, theirs in zip(calibrated(x), loaded(x), strict=True):
        assert torch.equal(mine, theirs)
    # Data only: the weights-only reader takes it, with no global allowed beyond tensors and values.
    state = torch.load(path, weights_only=True)
    assert state["format"] == FORMAT


def test_a_network_nested_from_your_own_model_loads_with_it(tmp_path):
    """tiny_rdn is nested without ``base=``: the file cannot rebuild it by name, the dense model does."""
    model = EarlyExitModel.calibrate(tiny_rdn(k=2), batches(200, seed=6), tolerance=0.0, policy_epochs=1)
    path = model.save(tmp_path / "model.rdn.pt")
    with pytest.raises(ValueError, match="pass model="):
        EarlyExitModel.load(path)
    loaded = EarlyExitModel.load(path, model=create(**BASE))
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_load_refuses_other_files(calibrated, tmp_path):
    checkpoint = tmp_path / "not_a_model.pt"
    torch.save({"model": calibrated.net.state_dict()}, checkpoint)
    with pytest.raises(ValueError, match="not an early-exit model file"):
        EarlyExitModel.load(checkpoint)
    newer = tmp_path / "newer.pt"
    torch.save(calibrated.state() | {"version": 99}, newer)
    with pytest.raises(ValueError, match="format version 99"):
        EarlyExitModel.load(newer)

    class Trap:
        def __reduce__(self):
            return (os.system, ("echo trapped",))

    trap = tmp_path / "trap.pt"
    torch.save({"format": FORMAT, "payload": Trap()}, trap)
    with pytest.raises(UnsafeFileError):
        EarlyExitModel.load(trap)


def test_export_a_static_subnet(calibrated, tmp_path):
    written = calibrated.export(tmp_path / "exported", subnet=1, formats=["state_dict"])
    assert written["state_dict"].is_file()
    module = calibrated.net.export(1).eval()
    module.load_state_dict(torch.load(written["state_dict"], weights_only=True))
    without_spec = dataclasses.replace(calibrated.risk)
    with pytest.raises(ValueError, match="spec"):
        EarlyExitModel(calibrated.net, calibrated.policy, without_spec).export(tmp_path / "none")


def test_rdn_infer_runs_a_saved_model(calibrated, tmp_path, capsys):
    from PIL import Image

    from rdn.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    pixels = torch.randint(0, 256, (6, 30, 30), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
    for index, image in enumerate(pixels):
        Image.fromarray(image.numpy()).save(folder / f"{index}.png")  # resized to 28 by the decoder
    path = calibrated.save(tmp_path / "model.rdn.pt")
    assert main(["infer", str(folder), "--from", str(path), "--out", str(tmp_path / "predictions.csv")]) == 0
    assert "risk-controlled" in capsys.readouterr().err
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    assert len(rows) == 7 and rows[0].startswith("file,label")
    assert main(["infer", str(folder), "--from", str(path), "--epsilon", "0.1"]) == 2
    assert "certified" in capsys.readouterr().err
    assert main(["infer", str(folder), "--from", str(path), "--subnet", "1"]) == 0  # static N_1 still works
