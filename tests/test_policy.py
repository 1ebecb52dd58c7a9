"""Exit policy: decision rules, λ / τ calibration, training, storage, bad input, outputs of a tiny RDN."""

import copy
import functools
import json
import math

import pytest
import torch
from torch import Tensor

from rdn.models import create
from rdn.policy import (
    ExitOutputs,
    ExitPolicy,
    calibrate_confidence,
    calibrate_lambda,
    check_epsilon,
    collect_exit_outputs,
    confidence_exits,
    evaluate_exits,
    exit_macs,
    exit_savings,
    first_feature_width,
    fit_policy,
    lagrangian_exits,
    planned_exits,
    softmax_statistics,
)
from rdn.surgery import nest


def tiny_rdn(k: int = 2, seed: int = 0, depth_split: int | None = None):
    """A tiny MobileNetV2 RDN on 28×28 grey images (K = 2k − 1 exits, twice that with a depth
    split after ``blocks[depth_split]``), in eval mode."""
    torch.manual_seed(seed)
    model = create("mobilenet_v2", num_classes=10, input_size=28, in_chans=1, width_mult=0.25)
    calib = torch.randn(8, 1, 28, 28)
    return nest(model, k=k, mode="expand", select="greedy", calib=calib, seed=seed, depth_split=depth_split).eval()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convs on a busy machine: one intra-op thread avoids oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def net():
    return tiny_rdn()


def statistics_of(confidence: Tensor) -> Tensor:
    """(N, K) max probabilities → (N, K, 3) statistics of 10-class softmaxes with that maximum, the
    rest spread evenly."""
    rest = (1 - confidence) / 9
    entropy = -(confidence * confidence.log() + 9 * rest * rest.clamp_min(1e-12).log()) / math.log(10)
    return torch.stack([confidence, confidence - rest, entropy], dim=-1)


def synthetic_outputs(n: int = 600, k: int = 3, width: int = 6, seed: int = 0) -> ExitOutputs:
    """Exit k is correct when feature 0 exceeds a threshold that falls with k (later exits are better)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, width, generator=generator)
    thresholds = torch.linspace(0.8, -1.5, k)
    noise = 0.2 * torch.randn(n, k, generator=generator)
    correct = features[:, :1] + noise > thresholds
    confidence = torch.sigmoid(2 * (features[:, :1] - thresholds) + noise).clamp(0.1, 1.0)
    return ExitOutputs(features, correct, correct | (noise > 0), statistics_of(confidence),
                       torch.zeros(n, dtype=torch.long))  # fmt: skip


def hidden_outputs(n: int = 800, seed: int = 0) -> ExitOutputs:
    """Three exits: N_1 is always wrong, N_3 always right, and whether N_2 is right is noise to N_1
    (features and statistics) that shows only in N_2's own confidence: only a policy that plans
    again at N_2 can use it."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 4, generator=generator)
    correct_2 = torch.rand(n, generator=generator) < 0.5
    correct = torch.stack([torch.zeros(n, dtype=torch.bool), correct_2, torch.ones(n, dtype=torch.bool)], dim=1)
    confidence = torch.stack([torch.full((n,), 0.3), torch.where(correct_2, 0.95, 0.2), torch.full((n,), 0.9)], 1)
    return ExitOutputs(features, correct, correct, statistics_of(confidence), torch.zeros(n, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------


def test_lagrangian_rule_by_hand():
    p = torch.tensor([[0.5, 0.9, 0.95], [0.99, 0.99, 0.99]])
    r = torch.tensor([0.6, 0.3, 0.0], dtype=torch.float64)
    # λ = 0: argmax r·p = (0.30, 0.27, 0) → exit 1 for both.
    assert lagrangian_exits(p, r, 0.0).tolist() == [1, 1]
    # λ = 1: (1.6·0.5, 1.3·0.9, 1·0.95) = (0.8, 1.17, 0.95) → exit 2; the second sample stays at 1.
    assert lagrangian_exits(p, r, 1.0).tolist() == [2, 1]
    # λ → ∞: argmax p, ties to the cheapest exit.
    assert lagrangian_exits(p, r, math.inf).tolist() == [3, 1]
    assert lagrangian_exits(p, r, None).tolist() == [3, 3]
    allowed = torch.tensor([False, True, True])
    assert lagrangian_exits(p, r, 0.0, allowed).tolist() == [2, 2]
    assert lagrangian_exits(p, r, math.inf, allowed).tolist() == [3, 2]
    with pytest.raises(ValueError, match="lam"):
        lagrangian_exits(p, r, -0.1)


def test_planned_rule_by_hand():
    r = torch.tensor([0.6, 0.3, 0.0], dtype=torch.float64)
    # Stage 1 plans exit 2 for both samples; at stage 2 the first sample's p_2 drops: it goes on to 3.
    stage_1 = torch.tensor([[0.1, 0.9, 0.9], [0.1, 0.9, 0.9]])
    stage_2 = torch.tensor([[0.0, 0.2, 0.9], [0.0, 0.9, 0.9]])
    probabilities = torch.stack([stage_1, stage_2, torch.zeros(2, 3)], dim=1)
    allowed = torch.ones(3, dtype=torch.bool)
    sequential, one_shot = torch.tensor([True, True, True]), torch.tensor([True, False, False])
    assert planned_exits(probabilities, r, 1.0, allowed, sequential).tolist() == [3, 2]
    assert planned_exits(probabilities, r, 1.0, allowed, one_shot).tolist() == [2, 2]
    # Stage 2 is not a planning stage when the rule may not exit there: the stage-1 plan (now 3) stands.
    no_2 = torch.tensor([True, False, True])
    assert planned_exits(probabilities, r, 1.0, no_2, no_2).tolist() == [3, 3]
    assert planned_exits(probabilities, r, None, allowed, sequential).tolist() == [3, 3]


def test_softmax_statistics_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    statistics = softmax_statistics(logits)
    torch.testing.assert_close(statistics[0], torch.tensor([0.5, 0.0, 1.0]))
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    torch.testing.assert_close(statistics[1], torch.tensor([0.75, 0.5, entropy]))
    with pytest.raises(ValueError, match="C >= 2"):
        softmax_statistics(torch.zeros(3, 1))


def test_confidence_rule_by_hand():
    confidence = torch.tensor([[0.9, 0.95, 0.99], [0.2, 0.7, 0.6], [0.1, 0.1, 0.1]])
    assert confidence_exits(confidence, 0.8).tolist() == [1, 3, 3]
    assert confidence_exits(confidence, 0.5).tolist() == [1, 2, 3]
    assert confidence_exits(confidence, 0.0).tolist() == [1, 1, 1]
    assert confidence_exits(confidence, None).tolist() == [3, 3, 3]


@pytest.mark.parametrize("epsilon", [0, 1, -0.1, 1.5, 0.0, 1.0])
def test_epsilon_outside_open_interval(epsilon):
    with pytest.raises(ValueError, match="open interval"):
        check_epsilon(epsilon)


@pytest.mark.parametrize("epsilon", ["0.1", None, True])
def test_epsilon_type(epsilon):
    with pytest.raises(TypeError, match="epsilon"):
        check_epsilon(epsilon)


# ----------------------------------------------------------------------------------------------
# Training and calibration
# ----------------------------------------------------------------------------------------------


def fresh_policy(outputs: ExitOutputs, mode: str = "sequential", epochs: int = 40,
                 target: str = "correctness") -> ExitPolicy:  # fmt: skip
    torch.manual_seed(0)
    policy = ExitPolicy(outputs.feature_width, [0.7, 0.4, 0.0], hidden=16, mode=mode, target=target)
    fit_policy(policy, outputs, epochs=epochs, batch_size=64, lr=1e-2, progress=False)
    return policy


@functools.cache
def _trained_on_synthetic(mode: str) -> ExitPolicy:
    return fresh_policy(synthetic_outputs(), mode, epochs=20)


def trained_policy(mode: str = "sequential") -> ExitPolicy:
    """A policy trained on ``synthetic_outputs()`` (a copy: tests may restrict or calibrate it)."""
    return copy.deepcopy(_trained_on_synthetic(mode))


@pytest.mark.parametrize("mode", ["sequential", "one_shot"])
def test_fit_policy_learns_correctness(mode):
    train, held_out = synthetic_outputs(seed=0), synthetic_outputs(seed=1)
    policy = fresh_policy(train, mode, epochs=20)
    with torch.no_grad():
        p = policy.probabilities(held_out.features, held_out.statistics[:, :1])
    # Held-out BCE well below the entropy of the marginal (what a constant predictor achieves).
    targets = held_out.correct.float()
    bce = torch.nn.functional.binary_cross_entropy(p, targets).item()
    marginal = targets.mean(0).clamp(1e-6, 1 - 1e-6)
    entropy = -(marginal * marginal.log() + (1 - marginal) * (1 - marginal).log()).mean().item()
    assert bce < 0.5 * entropy
    assert torch.allclose(policy.feature_mean, train.features.mean(0))


def accuracy_of(exits, outputs):
    return outputs.correct[torch.arange(outputs.num_samples), exits - 1].double().mean().item()


@pytest.mark.parametrize("mode", ["sequential", "one_shot"])
@pytest.mark.parametrize("epsilon", [0.08, 0.15, 0.3])
def test_calibrated_lambda_is_smallest_passing(epsilon, mode):
    outputs = synthetic_outputs()
    policy = trained_policy(mode)
    lam = calibrate_lambda(policy, outputs, [epsilon])[epsilon]
    assert policy.lambda_for(epsilon) == lam

    def accuracy(lam: float) -> float:
        with torch.no_grad():
            return accuracy_of(policy.exits(outputs.features, outputs.statistics, lam), outputs)

    assert accuracy(lam) >= 1 - epsilon
    if lam > 0:
        t = lam / (1 + lam)
        assert accuracy((t - 1e-9) / (1 - t + 1e-9)) < 1 - epsilon
    # A grid scan agrees: no grid λ noticeably below λ* passes (accuracy is monotone here).
    for grid_lam in torch.linspace(0, lam, 50)[:-1].tolist():
        if grid_lam < lam * (1 - 1e-6):
            assert accuracy(grid_lam) < 1 - epsilon


def test_one_shot_follows_the_plan_made_at_the_first_exit():
    outputs = synthetic_outputs()
    policy = trained_policy("one_shot")
    with torch.no_grad():
        p = policy.probabilities(outputs.features, outputs.statistics[:, :1])
        for lam in (0.0, 0.5, 3.0):
            expected = lagrangian_exits(p, policy.savings, lam)
            assert torch.equal(policy.exits(outputs.features, outputs.statistics, lam), expected)
    assert policy.decision_macs(torch.tensor([1, 3])).tolist() == [policy.macs()] * 2


def test_sequential_policy_uses_what_later_exits_see():
    outputs = hidden_outputs()
    savings = [0.8, 0.5, 0.0]
    costs = {}
    for mode in ("sequential", "one_shot"):
        policy = ExitPolicy(outputs.feature_width, savings, hidden=16, mode=mode, target="correctness")
        fit_policy(policy, outputs, epochs=30, batch_size=64, lr=1e-2, progress=False)
        lam = calibrate_lambda(policy, outputs, [0.01])[0.01]
        with torch.no_grad():
            exits = policy.exits(outputs.features, outputs.statistics, lam)
        assert accuracy_of(exits, outputs) >= 0.99
        costs[mode] = evaluate_exits(exits, outputs, torch.tensor([2.0, 5.0, 10.0]), mode).macs
    # One shot cannot tell N_2's good half from its bad half: (nearly) everyone runs to N_3, N_2 only
    # for the few samples the noise features happen to single out. Planning again at N_2 lets its
    # confident half (≈ 50 %, 7.5 MACs on average) stop there.
    assert costs["one_shot"] > 9.0
    assert costs["sequential"] < 8.0


@pytest.mark.parametrize("target", ["agreement", "correctness"])
def test_training_feeds_the_mlp_what_it_reads_when_deciding(target):
    """Every row fit_policy trains on (a sample at a stage s) is an input forward gives the MLP for
    that sample at stage s: the statistics of exits past s zero *and flagged unknown*. Flagging
    every exit known in training (as rdn did before) trained the MLP on inputs it never decides on."""
    outputs = synthetic_outputs(n=24)
    outputs = ExitOutputs(outputs.features, outputs.correct, outputs.correct_top5, outputs.statistics,
                          outputs.labels, predictions=outputs.correct.long())  # fmt: skip
    policy = ExitPolicy(outputs.feature_width, [0.7, 0.4, 0.0], hidden=8, target=target, members=1)
    seen: list[Tensor] = []
    hook = policy.mlp.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach().clone()))
    fit_policy(policy, outputs, epochs=1, batch_size=8, progress=False)
    trained_on = torch.cat(seen)
    seen.clear()
    stages = range(1, 3) if target == "agreement" else range(1, 4)  # agreement: nothing to learn at N_K
    for stage in stages:
        policy(outputs.features, outputs.statistics[:, :stage])
    hook.remove()
    decided_on = torch.cat(seen)
    assert trained_on.shape == decided_on.shape
    # Same rows up to order: sort both lexicographically by every column.
    def ordered(rows: Tensor) -> Tensor:
        for column in reversed(range(rows.shape[1])):
            rows = rows[rows[:, column].argsort(stable=True)]
        return rows
    torch.testing.assert_close(ordered(trained_on), ordered(decided_on))


def test_the_members_probabilities_are_averaged():
    policy = ExitPolicy(4, [0.7, 0.4, 0.0], hidden=8, members=3, target="correctness")
    features, statistics = torch.randn(6, 4), torch.rand(6, 2, 3)
    with torch.no_grad():
        members = policy.member_logits(features, statistics, torch.full((6,), 2))
        expected = torch.sigmoid(members).mean(1)
        torch.testing.assert_close(policy.probabilities(features, statistics), expected)
        alone = ExitPolicy(4, [0.7, 0.4, 0.0], hidden=8, members=1, target="correctness")
        torch.testing.assert_close(alone(features, statistics), alone.member_logits(features, statistics,
                                                                             torch.full((6,), 2))[:, 0])  # fmt: skip


def test_each_member_learns_as_if_alone():
    """Member 0 of a two-member ensemble ends where a one-member policy started from its weights does."""
    outputs = synthetic_outputs(n=200)
    pair = ExitPolicy(outputs.feature_width, [0.7, 0.4, 0.0], hidden=8, members=2, target="correctness")
    single = ExitPolicy(outputs.feature_width, [0.7, 0.4, 0.0], hidden=8, members=1, target="correctness")

    def member_zero(policy: ExitPolicy) -> list[Tensor]:
        first, middle, last = policy.mlp[0], policy.mlp[2], policy.mlp[4]
        return [first.weight[:8], first.bias[:8], middle.weight[0], middle.bias[0], last.weight[0], last.bias[0]]

    with torch.no_grad():
        for mine, theirs in zip(member_zero(single), member_zero(pair), strict=True):
            mine.copy_(theirs)
    for policy in (pair, single):
        fit_policy(policy, outputs, epochs=2, batch_size=32, seed=3, progress=False)
    for mine, theirs in zip(member_zero(single), member_zero(pair), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


def test_a_member_is_taken_out_and_put_back():
    policy = ExitPolicy(4, [0.7, 0.4, 0.0], hidden=8, members=3, target="correctness")
    features, statistics = torch.randn(5, 4), torch.rand(5, 2, 3)
    with torch.no_grad():
        second = policy.member(1)
        torch.testing.assert_close(second(features, statistics),
                                   policy.member_logits(features, statistics, torch.full((5,), 2))[:, 1])  # fmt: skip
        second.mlp[4].bias.add_(1.0)
        policy.set_member(0, second)
        torch.testing.assert_close(policy.member_logits(features, statistics, torch.full((5,), 2))[:, 0],
                                   second(features, statistics))  # fmt: skip
    with pytest.raises(IndexError, match=r"member must be an int in 0\.\.2"):
        policy.member(3)
    with pytest.raises(ValueError, match="one-member policy"):
        policy.set_member(0, ExitPolicy(4, [0.7, 0.4, 0.0], hidden=6, members=1))


def test_a_single_mlp_state_from_before_ensembles_loads():
    """rdn saved one MLP of nn.Linear layers (2-D weights): it loads as a one-member policy."""
    policy = ExitPolicy(4, [0.7, 0.4, 0.0], hidden=8, members=1)
    old = {key: value.squeeze(0) if key.startswith(("mlp.2.", "mlp.4.")) else value
           for key, value in policy.state_dict().items()}  # fmt: skip
    assert old["mlp.2.weight"].shape == (8, 8)
    assert ExitPolicy.architecture_of(old) == {"hidden": 8, "members": 1}
    loaded = ExitPolicy(4, [0.7, 0.4, 0.0], **ExitPolicy.architecture_of(old))
    loaded.load_state_dict(old)
    features, statistics = torch.randn(5, 4), torch.rand(5, 3, 3)
    torch.testing.assert_close(loaded(features, statistics), policy(features, statistics))
    assert ExitPolicy.architecture_of(ExitPolicy(4, [0.7, 0.0], hidden=6).state_dict()) == {"hidden": 6, "members": 3}


def test_sequential_decision_macs_count_the_planning_stages():
    policy = ExitPolicy(4, [0.7, 0.5, 0.2, 0.0], hidden=8)
    policy.restrict_exits([1, 3, 4])
    exits = torch.tensor([1, 3, 4])
    assert policy.planning_stages().tolist() == [True, False, True, True]
    assert policy.decision_macs(exits).tolist() == [policy.macs() * n for n in (1, 2, 3)]


def test_tighter_target_costs_more():
    outputs = synthetic_outputs()
    policy = trained_policy()
    lambdas = calibrate_lambda(policy, outputs, [0.3, 0.15, 0.08])
    macs = torch.tensor([3.0, 6.0, 10.0], dtype=torch.float64)
    with torch.no_grad():
        exits = {e: policy.exits(outputs.features, outputs.statistics, lambdas[e]) for e in (0.3, 0.15, 0.08)}
    costs = [evaluate_exits(exits[e], outputs, macs, "p").macs for e in (0.3, 0.15, 0.08)]
    assert costs == sorted(costs)
    assert lambdas[0.3] <= lambdas[0.15] <= lambdas[0.08]


def test_restricted_exits_are_never_chosen():
    outputs = synthetic_outputs()
    policy = trained_policy()
    policy.restrict_exits([1, 3])
    lambdas = calibrate_lambda(policy, outputs, [0.1, 0.3])
    for lam in lambdas.values():
        assert not policy.exits(outputs.features, outputs.statistics, lam).eq(2).any()
    with pytest.raises(ValueError, match="including 3"):
        policy.restrict_exits([1, 2])


def test_unreachable_epsilon_warns_and_falls_back_to_last_exit():
    outputs = synthetic_outputs()
    policy = trained_policy()
    best = outputs.correct.any(1).double().mean().item()  # an oracle's accuracy: nothing reaches above it
    epsilon = (1 - best) / 2
    with pytest.warns(RuntimeWarning, match="falling back"):
        lambdas = calibrate_lambda(policy, outputs, [epsilon])
    assert lambdas[epsilon] is None
    assert policy.exits(outputs.features, outputs.statistics, policy.lambda_for(epsilon)).eq(3).all()


def test_confidence_threshold_is_smallest_passing():
    outputs = synthetic_outputs()
    for epsilon in (0.08, 0.2):
        tau = calibrate_confidence(outputs, epsilon)
        assert accuracy_of(confidence_exits(outputs.confidence, tau), outputs) >= 1 - epsilon
        assert accuracy_of(confidence_exits(outputs.confidence, tau - 1e-9), outputs) < 1 - epsilon
    with pytest.warns(RuntimeWarning, match="confidence threshold"):
        assert calibrate_confidence(outputs, 1e-6) is None


def test_calibration_of_another_model_is_rejected():
    policy = trained_policy()
    other_exits = synthetic_outputs(k=5)
    other_width = synthetic_outputs(width=7)
    for other in (other_exits, other_width):
        with pytest.raises(ValueError, match="another model"):
            calibrate_lambda(policy, other, [0.1])
        with pytest.raises(ValueError, match="another model"):
            fit_policy(policy, other, epochs=1, progress=False)


def test_calibration_travels_with_the_state_dict(tmp_path):
    outputs = synthetic_outputs()
    policy = trained_policy("one_shot")
    with pytest.warns(RuntimeWarning):
        calibrate_lambda(policy, outputs, [0.08, 0.2, 1e-6])
    torch.save(policy.state_dict(), tmp_path / "policy.pt")
    loaded = ExitPolicy(outputs.feature_width, [0.7, 0.4, 0.0], hidden=16, mode="one_shot", target="correctness")
    loaded.load_state_dict(torch.load(tmp_path / "policy.pt", weights_only=True))
    assert loaded.lambdas == policy.lambdas
    assert torch.equal(loaded.exits(outputs.features, outputs.statistics, loaded.lambda_for(0.2)),
                       policy.exits(outputs.features, outputs.statistics, policy.lambda_for(0.2)))
    calibration = json.loads(policy.calibration_json())
    assert calibration["mode"] == "one_shot"
    pairs = calibration["pairs"]
    assert [(pair["epsilon"], pair["lambda"]) for pair in pairs] == sorted(policy.lambdas.items())
    with pytest.raises(KeyError, match="not calibrated"):
        policy.lambda_for(0.5)


def test_policy_constructor_checks():
    with pytest.raises(ValueError, match="feature_width"):
        ExitPolicy(0, [0.5, 0.0])
    with pytest.raises(ValueError, match="savings"):
        ExitPolicy(4, [1.5, 0.0])
    with pytest.raises(ValueError, match="mode"):
        ExitPolicy(4, [0.5, 0.0], mode="greedy")
    with pytest.raises(ValueError, match="members"):
        ExitPolicy(4, [0.5, 0.0], members=0)
    one_member = (4 + 4 * 2) * 8 + 8 * 8 + 8 * 2  # features + statistics + flags → 8 → 8 → 2
    assert ExitPolicy(4, [0.5, 0.0], hidden=8, members=1).macs() == one_member
    policy = ExitPolicy(4, [0.5, 0.0], hidden=8)
    assert policy.macs() == 3 * one_member  # three members by default
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        policy(torch.zeros(3, 5), torch.zeros(3, 1, 3))
    with pytest.raises(ValueError, match="statistics"):
        policy(torch.zeros(3, 4), torch.zeros(3, 3, 3))
    one_shot = ExitPolicy(4, [0.5, 0.0], hidden=8, mode="one_shot")
    assert one_shot.macs() == 3 * (4 * 8 + 8 * 8 + 8 * 2)  # N_1's features only
    with pytest.raises(ValueError, match="mode='one_shot'"):
        policy.set_extra_state(one_shot.get_extra_state())


def test_evaluate_exits_by_hand():
    correct = torch.tensor([[False, True], [True, True], [False, False], [True, False]])
    labels = torch.zeros(4, dtype=torch.long)
    outputs = ExitOutputs(torch.zeros(4, 2), correct, correct | True, torch.ones(4, 2, 3), labels)
    point = evaluate_exits(torch.tensor([2, 1, 2, 1]), outputs, torch.tensor([1.0, 4.0]), "x", extra_macs=0.5)
    assert point.accuracy == 0.75 and point.top5 == 1.0
    assert point.macs == pytest.approx(2.5 + 0.5)
    per_sample = evaluate_exits(torch.tensor([2, 1, 2, 1]), outputs, torch.tensor([1.0, 4.0]), "x",
                                extra_macs=torch.tensor([2.0, 1.0, 2.0, 1.0]))  # fmt: skip
    assert per_sample.macs == pytest.approx(2.5 + 1.5)
    with pytest.raises(ValueError, match="statistics"):
        ExitOutputs(torch.zeros(4, 2), correct, correct, torch.ones(4, 2), labels)
    assert point.saving == pytest.approx(1 - 3.0 / 4.0)
    assert point.exit_fractions == [0.5, 0.5]


# ----------------------------------------------------------------------------------------------
# On a real (tiny) RDN
# ----------------------------------------------------------------------------------------------


def test_savings_from_macs(net):
    macs = exit_macs(net)
    savings = exit_savings(net)
    assert macs.tolist() == [float(net.macs(k)) for k in range(1, net.num_subnets + 1)]
    assert savings[-1] == 0 and bool((savings[:-1] > savings[1:]).all()) and bool((savings >= 0).all())


def test_collected_outputs_match_each_subnet(net):
    torch.manual_seed(1)
    x, y = torch.randn(12, 1, 28, 28), torch.randint(0, 10, (12,))
    outputs = collect_exit_outputs(net, [(x[:5], y[:5]), (x[5:], y[5:])], progress=False)
    assert outputs.num_exits == net.num_subnets and outputs.feature_width == net.heads[0].in_features
    with torch.no_grad():
        first = net(x, subnet=1)
        # The captured features are what N_1's head reads: they reproduce N_1's logits.
        torch.testing.assert_close(net.classifier(net.heads[0](outputs.features)), first, rtol=1e-4, atol=1e-4)
        for k in range(1, net.num_subnets + 1):
            logits = net(x, subnet=k)
            assert torch.equal(outputs.correct[:, k - 1], logits.argmax(1) == y)
            torch.testing.assert_close(outputs.statistics[:, k - 1], softmax_statistics(logits))
            torch.testing.assert_close(outputs.confidence[:, k - 1], logits.softmax(1).amax(1))
            assert torch.equal(outputs.correct_top5[:, k - 1], (logits.topk(5, 1).indices == y[:, None]).any(1))
    restored = ExitOutputs.from_state_dict(outputs.state_dict())
    assert torch.equal(restored.features, outputs.features)


def test_shallow_first_exit_features():
    """With a depth split N_1 is shallow: its features are its alignment block's pooled output."""
    net = tiny_rdn(depth_split=6)
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    outputs = collect_exit_outputs(net, [(x, y)], progress=False)
    assert outputs.num_exits == net.num_subnets == 6 and outputs.feature_width == first_feature_width(net)
    with torch.no_grad():
        torch.testing.assert_close(net.classifier(outputs.features), net(x, subnet=1), rtol=1e-4, atol=1e-4)
    ExitPolicy.for_network(net).check_network(net)


def test_policy_for_network(net):
    policy = ExitPolicy.for_network(net, hidden=8)
    assert policy.num_exits == net.num_subnets and policy.feature_width == net.heads[0].in_features
    policy.check_network(net)
    with pytest.raises(ValueError, match="sub-networks"):
        ExitPolicy(policy.feature_width + 1, policy.savings).check_network(net)


# ----------------------------------------------------------------------------------------------
# The agreement target: p_k ≈ Pr(N_k predicts what N_K predicts), p_K = 1
# ----------------------------------------------------------------------------------------------


def agreeing_outputs(n: int = 600, seed: int = 0) -> ExitOutputs:
    """``synthetic_outputs`` with predictions: a wrong exit predicts the class after the label, so
    exit k agrees with N_K exactly when both are right or both wrong. Labels are random."""
    outputs = synthetic_outputs(n=n, seed=seed)
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed + 100))
    predictions = torch.where(outputs.correct, labels[:, None], (labels[:, None] + 1) % 10)
    return ExitOutputs(outputs.features, outputs.correct, outputs.correct_top5, outputs.statistics, labels,
                       predictions)  # fmt: skip


def test_agreement_probabilities_pin_the_last_exit_to_one():
    policy = ExitPolicy(4, [0.7, 0.4, 0.0], hidden=8, target="agreement")
    with torch.no_grad():
        policy.mlp[-1].bias.fill_(40.0)  # sigmoid(40) is exactly 1 in float32
        p = policy.probabilities(torch.randn(5, 4), torch.rand(5, 2, 3))
    assert torch.equal(p[:, -1], torch.ones(5))
    assert bool((p[:, :-1] < 1).all())
    # λ = ∞ compares p_k alone: the pinned p_K wins everywhere, so the rule is exactly "always N_K".
    statistics = torch.rand(5, 3, 3)
    assert torch.equal(policy.exits(torch.randn(5, 4), statistics, math.inf), torch.full((5,), 3))


def test_agreement_policy_learns_without_labels():
    train, held_out = agreeing_outputs(seed=0), agreeing_outputs(seed=1)
    scrambled = ExitOutputs(train.features, ~train.correct, ~train.correct_top5, train.statistics,
                            train.labels.flip(0), train.predictions)  # fmt: skip
    policy = fresh_policy(scrambled, epochs=20, target="agreement")
    reference = fresh_policy(train, epochs=20, target="agreement")
    for name, value in policy.state_dict().items():  # labels and correctness are never read
        if isinstance(value, Tensor):
            assert torch.equal(value, reference.state_dict()[name]), name
    with torch.no_grad():
        p = policy.probabilities(held_out.features, held_out.statistics[:, :1])[:, :-1]
    agree = (held_out.predictions == held_out.predictions[:, -1:])[:, :-1].float()
    bce = torch.nn.functional.binary_cross_entropy(p, agree).item()
    marginal = agree.mean(0).clamp(1e-6, 1 - 1e-6)
    entropy = -(marginal * marginal.log() + (1 - marginal) * (1 - marginal).log()).mean().item()
    assert bce < 0.7 * entropy  # a constant predictor gets the entropy; agreement is noisier than correctness here
    with pytest.raises(ValueError, match="predictions"):
        fresh_policy(synthetic_outputs(), epochs=1, target="agreement")


def test_agreement_lambda_path_starts_at_the_last_exit():
    """Lowering λ from ∞ lets samples leave early one by one: the saving grows from 0 and the
    disagreement with N_K stays small at first, which is what the consistency calibration needs."""
    from rdn.calibration import calibrate_consistency, consistency_losses

    outputs = agreeing_outputs(n=2000, seed=2)
    policy = fresh_policy(agreeing_outputs(seed=0), epochs=20, target="agreement")
    exits = [policy.exits(outputs.features, outputs.statistics, lam) for lam in (math.inf, 1e6, 20.0, 1.0, 0.0)]
    leaving = [(e < 3).double().mean().item() for e in exits]
    assert leaving[0] == 0.0
    assert leaving == sorted(leaving) and leaving[-1] > 0.5
    assert consistency_losses(outputs, exits[2]).double().mean().item() < 0.05
    control = calibrate_consistency(policy, outputs, delta=0.05, alpha=0.1)
    assert control.parameter is not None and control.saving > 0.2


def test_target_travels_with_the_state_dict():
    agreement = ExitPolicy(4, [0.5, 0.0], hidden=8)
    assert agreement.target == "agreement"
    correctness = ExitPolicy(4, [0.5, 0.0], hidden=8, target="correctness")
    with pytest.raises(ValueError, match="target='correctness'"):
        agreement.set_extra_state(correctness.get_extra_state())
    older = {"mode": "sequential", "lambdas": []}  # saved before targets existed: correctness
    correctness.set_extra_state(older)
    with pytest.raises(ValueError, match="target"):
        agreement.set_extra_state(older)
    with pytest.raises(ValueError, match="target"):
        ExitPolicy(4, [0.5, 0.0], target="accuracy")
    assert json.loads(agreement.calibration_json())["target"] == "agreement"
