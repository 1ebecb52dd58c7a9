"""Joint loss, exit weights, EMA and the learning-rate schedule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rdn.train import JointLoss, ModelEma, TrainConfig, WarmupCosine, exit_weights


def test_exit_weights_ablations():
    assert exit_weights(4) == [0.25] * 4
    assert exit_weights(4, "all_but_lightest") == [0.0, 1 / 3, 1 / 3, 1 / 3]
    assert exit_weights(4, "largest") == [0.0, 0.0, 0.0, 1.0]
    assert exit_weights(3, "largest", [2.0, 3.0, 5.0]) == [0.0, 0.0, 5.0]
    assert exit_weights(1) == [1.0]
    with pytest.raises(ValueError, match="at least 2 exits"):
        exit_weights(1, "all_but_lightest")
    with pytest.raises(ValueError, match="3 entries, the model has 4"):
        exit_weights(4, "all", [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="exits must be one of"):
        exit_weights(4, "smallest")


def test_joint_loss_is_the_weighted_sum_of_per_exit_ce():
    torch.manual_seed(0)
    logits = [torch.randn(6, 5, requires_grad=True) for _ in range(3)]
    target = torch.randint(5, (6,))
    loss, per_exit = JointLoss([0.2, 0.3, 0.5], label_smoothing=0.1)(logits, target)
    expected = [F.cross_entropy(z, target, label_smoothing=0.1) for z in logits]
    torch.testing.assert_close(per_exit, torch.stack(expected))
    torch.testing.assert_close(loss, 0.2 * expected[0] + 0.3 * expected[1] + 0.5 * expected[2])


def test_in_place_distillation_teaches_small_exits_only():
    torch.manual_seed(0)
    logits = [torch.randn(6, 5, requires_grad=True) for _ in range(2)]
    target = torch.randint(5, (6,))
    loss, _ = JointLoss([0.5, 0.5], distill=1.0, temperature=2.0)(logits, target)
    loss.backward()
    # N_K's soft labels are detached: its gradient is the plain CE gradient alone.
    reference = logits[1].detach().clone().requires_grad_(True)
    (0.5 * F.cross_entropy(reference, target)).backward()
    torch.testing.assert_close(logits[1].grad, reference.grad)
    # With α = 1, N_1 learns only to match N_K: its gradient vanishes when the two agree.
    same = logits[1].detach().clone()
    student = same.clone().requires_grad_(True)
    JointLoss([0.5, 0.5], distill=1.0)([student, same.requires_grad_(True)], target)[0].backward()
    assert student.grad.abs().max() < 1e-6


def test_ema_follows_with_warm_up_and_copies_buffers():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = ModelEma(model, decay=0.99)
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(7.0)
    before = ema.module[0].weight.clone()
    ema.update(model)
    decay = min(0.99, 2 / 11)
    torch.testing.assert_close(ema.module[0].weight, decay * before + (1 - decay) * model[0].weight)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_warmup_cosine_schedule():
    schedule = WarmupCosine(total_steps=100, warmup_steps=10, min_ratio=0.01)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0) and schedule(55) == pytest.approx(0.505)
    assert schedule(100) == pytest.approx(0.01)
    assert all(schedule(t) >= schedule(t + 1) for t in range(10, 100))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="exits must be one of"):
        TrainConfig(exits="lightest")
    with pytest.raises(ValueError, match="distill must be"):
        TrainConfig(distill=2.0)
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \[.epochz.\]"):
        TrainConfig.from_dict({"epochz": 1})
    assert TrainConfig(batch_size=512).peak_lr == pytest.approx(0.2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_a_joint_step_runs_under_autocast(device):
    """The GPU training loop runs under torch.autocast by default (TrainConfig.amp = "auto"); the
    nested layers then get 16-bit inputs from the stock layers before them. CPU autocast stands in
    where there is no GPU (`make gpu-check` runs the CUDA case, with backend="auto")."""
    from tests.train.helpers import tiny_rdn

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    net = tiny_rdn().train().to(device)
    images = torch.randn(8, 1, 16, 16, device=device)
    labels = torch.randint(0, 10, (8,), device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        logits = net(images)
        loss, _ = JointLoss(exit_weights(len(logits)))(logits, labels)
    assert all(exit_logits.dtype == torch.bfloat16 for exit_logits in logits)
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
