"""The training loop on tiny models: joint one-pass training, ablations, exact resume, logs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from rdn.data import BatchTransform
from rdn.models import create
from rdn.train import (
    CheckpointMismatchError,
    NonFiniteLossError,
    TrainConfig,
    evaluate,
    fit,
    load_checkpoint,
    load_model,
    model_config_of,
    recalibrate_batch_norm,
    save_checkpoint,
)
from rdn.train.checkpoint import check_model_config, load_state_strict
from tests.train.helpers import TinyNet, synthetic, tiny_rdn

BASE = {"name": "mobilenet_v2", "num_classes": 10, "input_size": 16, "in_chans": 1, "width_mult": 0.1}


def config(**changes) -> TrainConfig:
    settings = {"epochs": 2, "batch_size": 16, "lr": 0.05, "warmup_epochs": 0.5, "ema_decay": 0.9,
                "bn_momentum": None, "progress": False, "eval_batch_size": 64}  # fmt: skip
    return TrainConfig(**(settings | changes))


def test_joint_training_is_one_pass_and_trains_every_exit():
    data = synthetic()
    model = tiny_rdn()
    before = [head.weight.detach().clone() for head in model.heads]
    training_passes = []
    model.register_forward_hook(lambda module, args, output: training_passes.append(module.training))
    losses = []
    result = fit(model, data, config(epochs=3, lr=0.5), callbacks=[lambda info: losses.append(info.exit_losses)])
    steps = result.steps
    assert steps == 3 * (len(data.train) // 16)
    assert training_passes.count(True) == steps  # one forward of N_K per step for all K exits
    assert all(not torch.equal(b, h.weight) for b, h in zip(before, model.heads, strict=True))
    first, last = torch.tensor(losses[:3]).mean(0), torch.tensor(losses[-3:]).mean(0)
    assert (last < first).all(), (first, last)  # every exit's own CE went down
    row = result.history[-1]
    assert [f"test_top1_{s}" in row and f"ema_test_top5_{s}" in row for s in (1, 2, 3)] == [True] * 3
    assert row["train_top1"] > 20.0  # 10 classes: better than chance after a few steps


def test_largest_only_ablation_leaves_lighter_heads_untouched():
    model = tiny_rdn()
    before = [head.weight.detach().clone() for head in model.heads]
    fit(model, synthetic(), config(epochs=1, exits="largest"))
    assert torch.equal(before[0], model.heads[0].weight) and torch.equal(before[1], model.heads[1].weight)
    assert not torch.equal(before[2], model.heads[2].weight)


def test_evaluate_counts_top1_and_top5():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(()))

        def forward(self, x):  # exit 1 always ranks class 0 first, then 1..9; exit 2 is always right
            batch = x.shape[0]
            ranking = torch.arange(10, 0, -1, dtype=torch.float32).expand(batch, 10)
            return [ranking, torch.nn.functional.one_hot(self.labels[:batch], 10).float()]

    data = synthetic()
    model = Fixed()
    model.labels = data.test.labels
    result = evaluate(model, data.test, data.spec, batch_size=len(data.test))
    labels = data.test.labels
    assert result.top1 == pytest.approx([100 * (labels == 0).float().mean().item(), 100.0])
    assert result.top5 == pytest.approx([100 * (labels < 5).float().mean().item(), 100.0])
    assert result.samples == len(labels)


def _run(out, stop_at=None, resume=False):
    torch.manual_seed(123 if resume else 0)  # a resumed run must not depend on the fresh model's init
    model = create(**BASE)  # BN and dropout: buffers and the dropout RNG must resume too

    def stop(info):
        if info.step == stop_at:
            raise KeyboardInterrupt(f"killed at step {info.step}")

    cfg = config(epochs=2, checkpoint_every=3, seed=7)
    return fit(model, synthetic(), cfg, out=out, resume=resume, model_config={"kind": "base", "create": BASE},
               callbacks=[stop] if stop_at else [])  # fmt: skip


def test_resume_after_a_kill_mid_epoch_is_bit_exact(tmp_path):
    uninterrupted = _run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", stop_at=11)  # epoch 2 (7 steps per epoch); last checkpoint at step 9
    assert load_checkpoint(tmp_path / "b")["step"] == 9
    resumed = _run(tmp_path / "b", resume=True)
    assert resumed.steps == uninterrupted.steps == 14
    for key, value in uninterrupted.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    for key, value in uninterrupted.ema.module.state_dict().items():
        assert torch.equal(value, resumed.ema.module.state_dict()[key]), key
    final = load_checkpoint(tmp_path / "b")
    assert final["epoch"] == 2 and final["data"] == {"seed": 7, "epoch": 2, "batch": 0}
    rows = json.loads((tmp_path / "b" / "log.json").read_text())["epochs"]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["test_top1_1"] == uninterrupted.history[-1]["test_top1_1"]
    # The interrupted epoch's training metrics cover all its steps, those before the kill too.
    for key in ("train_loss", "train_top1"):
        assert rows[-1][key] == uninterrupted.history[-1][key], key
    model = load_model(tmp_path / "b")  # rebuilt from the checkpoint's model_config
    for key, value in uninterrupted.ema.module.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_logs_csv_json_png(tmp_path):
    fit(tiny_rdn(), synthetic(), config(epochs=2), out=tmp_path)
    header = (tmp_path / "log.csv").read_text().splitlines()[0].split(",")
    for column in ("epoch", "train_loss", "images_per_s", "test_top1_1", "test_top5_3", "ema_test_top1_3"):
        assert column in header
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 3
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class NaNAfter(TinyNet):
    """TinyNet whose logits turn NaN once ``poisoned`` is set."""

    poisoned = False

    def forward(self, x):
        logits = super().forward(x)
        return logits * float("nan") if self.poisoned else logits


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = NaNAfter()

    def poison(info):
        model.poisoned = info.step >= 5

    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 0, step 6 .*last good checkpoint"):
        fit(model, synthetic(), config(epochs=1, checkpoint_every=2), out=tmp_path, callbacks=[poison])
    state = load_checkpoint(tmp_path)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN step was not applied


def test_checkpoints_from_before_the_newer_config_keys_still_match():
    net = tiny_rdn(k=2, exact=True)  # what a checkpoint without the later keys meant: no budget, nothing pruned
    current = model_config_of(net)
    assert current["rdn_config"]["kind"] == "NestRecord" and current["rdn_config"]["version"] == 2
    # older checkpoints hold the flat version-1 rdn_config, the early ones without the keys added later
    legacy = {"kind": "rdn", "rdn_config": net.rdn_config}
    older = {"kind": "rdn", "rdn_config": {key: value for key, value in net.rdn_config.items()
                                           if key not in ("mac_budget", "pruned_blocks", "ties")}}  # fmt: skip
    check_model_config(current, legacy, "legacy.pt")
    check_model_config(current, older, "old.pt")
    check_model_config(older, current, "new.pt")
    pruned = {**legacy, "rdn_config": {**legacy["rdn_config"], "pruned_blocks": {"x": [[2, 0]]}}}
    with pytest.raises(CheckpointMismatchError, match=r"differ in \['pruned_blocks'\]"):
        check_model_config(current, pruned, "pruned.pt")


def test_resuming_another_models_checkpoint_is_refused(tmp_path):
    fit(tiny_rdn(k=2), synthetic(), config(epochs=1), out=tmp_path)
    mismatch = r"was written for RDN .*k=2.* this run has RDN .*k=3.*differ in \[.*'k'"
    with pytest.raises(CheckpointMismatchError, match=mismatch):
        fit(tiny_rdn(k=3), synthetic(), config(epochs=2), out=tmp_path, resume=True)
    with pytest.raises(ValueError, match="different training settings .*lr"):
        fit(tiny_rdn(k=2), synthetic(), config(epochs=1, lr=0.01), out=tmp_path, resume=True)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="not a readable torch checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointMismatchError, match="not an rdn checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_batch_size_larger_than_the_data():
    with pytest.raises(ValueError, match="batch_size 4096 is larger than the 112 training samples"):
        fit(TinyNet(), synthetic(), config(batch_size=4096))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "checkpoint.pt", {"step": 1})

    def broken_save(obj, handle):
        Path(handle).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_recalibrate_batch_norm_averages_batch_statistics():
    data = synthetic()
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 4), nn.BatchNorm1d(4, momentum=0.01)).eval()
    model[2].running_mean.fill_(100.0)
    recalibrate_batch_norm(model, data.train, data.spec, batches=3, batch_size=16)
    x = BatchTransform(data.spec, train=False)(data.train.images[:48], torch.arange(48))
    with torch.no_grad():
        features = model[1](x.flatten(1)).view(3, 16, 4)
    torch.testing.assert_close(model[2].running_mean, features.mean(1).mean(0))
    torch.testing.assert_close(model[2].running_var, features.var(1).mean(0))
    assert model[2].momentum == 0.01 and not model.training


def test_a_run_checkpointed_before_folded_heads_is_refused_not_resumed(tmp_path):
    """Its weights load (upgraded), but its optimizer state has the old heads' shapes."""
    from tests.surgery.test_heads import old_layout

    net = tiny_rdn()
    cfg = config(epochs=1)
    old_state, _, _ = old_layout(net)
    save_checkpoint(tmp_path / "checkpoint.pt", {
        "model_config": model_config_of(net), "model": old_state, "ema": None, "optimizer": {}, "scheduler": {},
        "scaler": {}, "rng": {}, "epoch": 0, "step": 3, "train_config": cfg.to_dict(),
    })  # fmt: skip
    with pytest.raises(CheckpointMismatchError, match="RDN heads were stored unfolded: its weights load .* cannot "
                                                      "resume"):  # fmt: skip
        fit(tiny_rdn(), synthetic(), cfg, out=tmp_path, resume=True)
    load_state_strict(tiny_rdn(), load_checkpoint(tmp_path)["model"], tmp_path)  # the weights themselves still load


def test_channels_last_training_matches_the_default_layout():
    """The memory format changes how convolutions run, not what they compute."""
    runs = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        result = fit(tiny_rdn(), synthetic(), config(epochs=1, steps_per_epoch=3, channels_last=channels_last))
        runs.append(result)
    weight = runs[1].model.stem.weight if hasattr(runs[1].model, "stem") else next(runs[1].model.parameters())
    assert weight.dim() != 4 or weight.is_contiguous(memory_format=torch.channels_last)
    for key, value in runs[0].model.state_dict().items():
        torch.testing.assert_close(runs[1].model.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert runs[1].history[-1]["train_loss"] == pytest.approx(runs[0].history[-1]["train_loss"], rel=1e-4)


def test_compiled_training_matches_eager():
    runs = []
    for compile in (False, True):
        torch.manual_seed(0)
        runs.append(fit(tiny_rdn(), synthetic(), config(epochs=1, steps_per_epoch=2, compile=compile)))
    for key, value in runs[0].model.state_dict().items():
        torch.testing.assert_close(runs[1].model.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
