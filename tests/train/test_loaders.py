"""fit on a user's own DataLoaders: training, evaluation, exact resume, and clear errors."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from rdn.train import TrainConfig, evaluate, fit
from tests.train.helpers import tiny_rdn


class NoisyImages(Dataset):
    """Float 1×16×16 images of 10 classes; training items get random noise and flips drawn from
    torch's RNG, as a torchvision transform would (the global RNG in-process, a seeded one in workers)."""

    def __init__(self, size: int, train: bool, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 10, (size,), generator=generator)
        templates = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(99))
        self.images = templates[self.labels] + 0.3 * torch.randn(size, 1, 16, 16, generator=generator)
        self.train = train

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.train:
            image = image + 0.1 * torch.randn(image.shape)
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return image, self.labels[index]


def loaders(workers: int = 0, generator: bool = True):
    train = DataLoader(NoisyImages(96, train=True), batch_size=16, shuffle=True, num_workers=workers,
                       generator=torch.Generator() if generator else None)  # fmt: skip
    test = DataLoader(NoisyImages(40, train=False, seed=1), batch_size=16)
    return train, test


def config(**changes) -> TrainConfig:
    values = {"epochs": 2, "batch_size": 16, "lr": 0.05, "warmup_epochs": 0.5, "ema_decay": 0.9, "progress": False,
              "checkpoint_every": 2, "seed": 3}  # fmt: skip
    return TrainConfig(**(values | changes))


def run(out, workers: int = 0, stop_at: int | None = None, resume: bool = False):
    torch.manual_seed(11 if resume else 0)  # a resumed run must not depend on the fresh model's init
    model = tiny_rdn()

    def stop(info):
        if info.step == stop_at:
            raise KeyboardInterrupt(f"killed at step {info.step}")

    train, test = loaders(workers)
    return fit(model, train, config(), eval_data=test, out=out, resume=resume, callbacks=[stop] if stop_at else [])


def test_fit_trains_and_evaluates_on_dataloaders(tmp_path):
    result = run(tmp_path)
    assert result.steps == 12  # 96 samples / 16 per batch, two epochs
    row = result.history[-1]
    assert {"train_loss", "test_top1_1", f"test_top1_{result.model.num_subnets}", "ema_test_top1_1"} <= set(row)
    _, test = loaders()
    again = evaluate(result.model, test)  # the same evaluation, from a user's loader
    assert again.samples == 40 and again.top1 == [row[f"test_top1_{s}"] for s in range(1, len(again.top1) + 1)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_on_a_dataloader_is_bit_exact(tmp_path, workers):
    uninterrupted = run(tmp_path / "a", workers)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", workers, stop_at=9)  # epoch 2 (6 steps per epoch); last checkpoint at step 8
    resumed = run(tmp_path / "b", workers, resume=True)
    assert resumed.steps == uninterrupted.steps == 12
    for key, value in uninterrupted.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    for key in ("train_loss", "train_top1", "test_top1_1"):
        assert resumed.history[-1][key] == uninterrupted.history[-1][key], key


def test_resuming_a_loader_without_a_generator_warns(tmp_path):
    def attempt(stop_at=None, resume=False):
        def stop(info):
            if info.step == stop_at:
                raise KeyboardInterrupt

        train, _ = loaders(generator=False)
        return fit(tiny_rdn(), train, config(epochs=1), out=tmp_path, resume=resume,
                   callbacks=[stop] if stop_at else [])  # fmt: skip

    with pytest.raises(KeyboardInterrupt):
        attempt(stop_at=3)
    with pytest.warns(RuntimeWarning, match="no generator: its order is drawn from the global RNG"):
        attempt(resume=True)


def test_a_loader_without_length_needs_steps_per_epoch():
    def stream():
        train, _ = loaders()
        yield from train

    with pytest.raises(ValueError, match="no length: set TrainConfig.steps_per_epoch"):
        fit(tiny_rdn(), stream(), config(epochs=1))
    assert fit(tiny_rdn(), stream(), config(epochs=1, steps_per_epoch=3)).steps == 3


@pytest.mark.parametrize(
    ("batches", "error", "pattern"),
    [
        ([torch.zeros(4, 1, 16, 16)], TypeError, r"must be \(images, labels\)"),
        ([(torch.zeros(4, 1, 16, 16, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))], TypeError,
         "images must be float tensors"),
        ([(torch.zeros(4, 1, 16, 16), torch.zeros(3, dtype=torch.long))], ValueError, "one per image"),
        ([(torch.zeros(4, 1, 16, 16), torch.zeros(4))], ValueError, "integer class indices"),
    ],
)  # fmt: skip
def test_bad_batches_are_refused_by_name(batches, error, pattern):
    with pytest.raises(error, match=pattern):
        fit(tiny_rdn(), batches, config(epochs=1, checkpoint_every=None))
    with pytest.raises(TypeError, match="data must be rdn.data.DataSplits or an iterable"):
        fit(tiny_rdn(), torch.zeros(3), config(epochs=1))


def test_per_epoch_evaluation_builds_no_graph(tmp_path):
    """fit's evaluation runs without autograd: a graph kept per evaluation batch grew its memory with
    the evaluation split (about 15 MB per 64-px image on a small MobileNetV2)."""
    model = tiny_rdn()
    modes: list[bool] = []
    model.register_forward_hook(lambda module, args, output: None if module.training
                                else modes.append(torch.is_grad_enabled()))  # fmt: skip
    train, test = loaders()
    fit(model, train, config(epochs=1, ema_decay=None), eval_data=test, out=tmp_path)
    assert modes and not any(modes)
