"""Dynamic inference: real early exit equals each sample's own sub-network, exited samples leave the
batch, measured accuracy / MACs agree with the exits, timing and memory helpers."""

import pytest
import torch

from rdn.inference import (
    dynamic_forward,
    evaluate_dynamic,
    measure,
    measure_peak_memory,
    measure_throughput,
    measure_throughputs,
)
from rdn.policy import (
    ExitPolicy,
    capture_first_features,
    collect_exit_outputs,
    evaluate_exits,
    exit_macs,
    softmax_statistics,
)
from tests.test_policy import one_thread, tiny_rdn  # noqa: F401  (one_thread: autouse fixture)


@pytest.fixture(scope="module")
def net():
    return tiny_rdn(k=3)  # K = 5 exits


def spread_policy(net, x, seed: int = 0, mode: str = "sequential") -> ExitPolicy:
    """An untrained policy with sharp random probabilities on features standardised over
    ``x``, so that the samples of ``x`` spread over the exits."""
    torch.manual_seed(seed)
    policy = ExitPolicy.for_network(net, hidden=16, mode=mode, members=1).eval()
    with torch.no_grad(), capture_first_features(net) as captured:
        first = net(x, subnet=1)
        policy.feature_mean.copy_(captured[0].mean(0))
        policy.feature_scale.copy_(captured[0].std(0).clamp_min(1e-6))
        # Centre and sharpen every exit's logit over x at N_1: each exit is likely for about half the samples.
        logits = policy(captured[0], softmax_statistics(first)[:, None])
        scale = 10 / logits.std(0).clamp_min(1e-6)
        policy.mlp[-1].weight.mul_(scale[:, None])
        policy.mlp[-1].bias.copy_(-(logits - policy.mlp[-1].bias).mean(0) * scale)
    return policy


def forced_policy(net, exit: int) -> ExitPolicy:
    """p_k = 1 at ``exit`` and 0 elsewhere: every sample leaves there (any λ)."""
    policy = ExitPolicy.for_network(net, hidden=4).eval()
    with torch.no_grad():  # every member alike
        policy.mlp[-1].weight.zero_()
        policy.mlp[-1].bias.fill_(-50.0)
        policy.mlp[-1].bias[:, exit - 1] = 50.0
    return policy


def record_steps(net, monkeypatch, targets: list[int] | None = None) -> list[int]:
    """Batch size of every ``net.step`` call (and its target exit into ``targets``)."""
    sizes: list[int] = []
    step = net.step

    def recording_step(state, subnet=None):
        sizes.append(state.logits.shape[0])
        result = step(state, subnet)
        if targets is not None:
            targets.append(result.subnet)
        return result

    monkeypatch.setattr(net, "step", recording_step)
    return sizes


def assert_own_subnetworks(net, x, output) -> None:
    """Every sample's logits are those of its exit's sub-network run alone."""
    with torch.no_grad():
        for s in output.exits.unique().tolist():
            rows = (output.exits == s).nonzero().squeeze(1)
            alone = net(x[rows], subnet=s)
            torch.testing.assert_close(output.logits[rows], alone, rtol=1e-4, atol=1e-4)
            assert torch.equal(output.logits[rows].argmax(1), alone.argmax(1))


def run_and_check_against_the_rule(net, policy, x, lam: float, strategy: str = "staged"):
    """Run the engine on ``x``: its exits must be the rule's on the collected outputs of every
    exit, its logits each sample's own sub-network's. Returns its output."""
    output = dynamic_forward(net, policy, x, lam, strategy=strategy)
    outputs = collect_exit_outputs(net, [(x, torch.zeros(x.shape[0], dtype=torch.long))], progress=False)
    assert torch.equal(output.exits, policy.exits(outputs.features, outputs.statistics, lam))
    assert_own_subnetworks(net, x, output)
    return output


@pytest.mark.parametrize("lam", [0.0, 0.3, 2.0])
def test_each_sample_gets_its_own_subnetworks_prediction(net, lam, monkeypatch):
    torch.manual_seed(2)
    x = torch.randn(24, 1, 28, 28)
    policy = spread_policy(net, x)
    sizes = record_steps(net, monkeypatch)
    output = dynamic_forward(net, policy, x, lam)
    exits = output.exits
    assert exits.shape == (24,) and int(exits.min()) >= 1 and int(exits.max()) <= net.num_subnets
    assert_own_subnetworks(net, x, output)
    # Real early exit: step s → s+1 runs exactly the samples whose exit is beyond s, and stops
    # after the deepest exit.
    expected = [int((exits > s).sum()) for s in range(1, int(exits.max()))]
    assert sizes == expected


@pytest.mark.parametrize("mode", ["sequential", "one_shot"])
@pytest.mark.parametrize("allowed", [[1, 3, 5], [2, 5], [1, 4, 5]])
def test_restricted_exits_jump_over_the_others(net, mode, allowed, monkeypatch):
    """With exits only at ``allowed``, the engine goes from one exit somebody can take to the next in
    one step per layer, and its exits equal the rule's on the collected outputs (the skipped
    exits' statistics come from their heads)."""
    torch.manual_seed(5)
    x = torch.randn(32, 1, 28, 28)
    policy = spread_policy(net, x, seed=1, mode=mode)
    policy.restrict_exits(allowed)
    targets: list[int] = []
    record_steps(net, monkeypatch, targets)
    output = run_and_check_against_the_rule(net, policy, x, 0.5)
    assert set(output.exits.unique().tolist()) <= set(allowed)
    assert set(targets) <= set(allowed) and targets == sorted(targets)


def staged_case(net, mode: str, allowed: list[int] | None, lam: float):
    """A batch, a spread policy (restricted to ``allowed`` exits) and the staged walk's output on it:
    what the other walks are compared with."""
    torch.manual_seed(7)
    x = torch.randn(32, 1, 28, 28)
    policy = spread_policy(net, x, seed=3, mode=mode)
    if allowed is not None:
        policy.restrict_exits(allowed)
    return x, policy, dynamic_forward(net, policy, x, lam)


@pytest.mark.parametrize("mode", ["sequential", "one_shot"])
@pytest.mark.parametrize("allowed", [None, [1, 3, 5], [2, 5]])
@pytest.mark.parametrize("lam", [0.0, 0.5, 2.0])
def test_the_jump_takes_the_staged_exits_in_one_step(net, mode, allowed, lam, monkeypatch):
    """strategy="jump": the same exits and logits as the staged walk, the samples past N_1 stepped to
    N_K in one call."""
    x, policy, staged = staged_case(net, mode, allowed, lam)
    targets: list[int] = []
    sizes = record_steps(net, monkeypatch, targets)
    jumped = run_and_check_against_the_rule(net, policy, x, lam, strategy="jump")
    assert torch.equal(jumped.exits, staged.exits)
    torch.testing.assert_close(jumped.logits, staged.logits, rtol=1e-4, atol=1e-4)
    going_on = int((staged.exits > 1).sum())
    assert (sizes, targets) == (([going_on], [net.num_subnets]) if going_on else ([], []))


@pytest.mark.parametrize("mode", ["sequential", "one_shot"])
@pytest.mark.parametrize("allowed", [None, [1, 3, 5], [2, 5]])
@pytest.mark.parametrize("lam", [0.0, 0.5, 2.0])
def test_recompute_takes_the_staged_exits_with_one_full_pass(net, mode, allowed, lam, monkeypatch):
    """strategy="recompute": the same exits and logits as the staged walk; the samples past N_1 run one
    static pass of the whole network (every exit at once) and no step."""
    x, policy, staged = staged_case(net, mode, allowed, lam)
    steps = record_steps(net, monkeypatch)
    passes: list[tuple[int, object]] = []
    forward = net.forward

    def recording_forward(images, subnet=None):
        passes.append((images.shape[0], subnet))
        return forward(images, subnet)

    monkeypatch.setattr(net, "forward", recording_forward)
    recomputed = dynamic_forward(net, policy, x, lam, strategy="recompute")
    monkeypatch.setattr(net, "forward", forward)
    going_on = int((staged.exits > 1).sum())
    assert steps == [] and passes == ([(going_on, None)] if going_on else [])
    assert torch.equal(recomputed.exits, staged.exits)
    torch.testing.assert_close(recomputed.logits, staged.logits, rtol=1e-4, atol=1e-4)
    run_and_check_against_the_rule(net, policy, x, lam, strategy="recompute")


@pytest.mark.parametrize("allowed", [[1, 2, 6], [2, 5, 6]])
def test_the_jump_over_depth_split_exits(allowed):
    net = tiny_rdn(k=2, depth_split=6)
    torch.manual_seed(6)
    x = torch.randn(24, 1, 28, 28)
    policy = spread_policy(net, x, seed=2)
    policy.restrict_exits(allowed)
    for strategy in ("jump", "recompute"):
        run_and_check_against_the_rule(net, policy, x, 0.5, strategy=strategy)


def test_an_unknown_strategy_is_refused(net):
    with pytest.raises(ValueError, match="strategy must be one of"):
        dynamic_forward(net, forced_policy(net, 1), torch.randn(2, 1, 28, 28), 0.1, strategy="fast")


@pytest.mark.parametrize("allowed", [[1, 2, 6], [1, 3, 6], [2, 5, 6]])
def test_depth_split_exits(allowed):
    """Exits alternate shallow / deep: a jump to a shallow exit never skips a deep one the policy's
    statistics need; every sample still gets its own sub-network's logits."""
    net = tiny_rdn(k=2, depth_split=6)  # exits (1,0) (1,1) (2,0) (2,1) (3,0) (3,1)
    torch.manual_seed(6)
    x = torch.randn(24, 1, 28, 28)
    policy = spread_policy(net, x, seed=2)
    policy.restrict_exits(allowed)
    run_and_check_against_the_rule(net, policy, x, 0.5)


def test_samples_spread_over_several_exits(net):
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    exits = dynamic_forward(net, spread_policy(net, x), x, 0.3).exits
    assert exits.unique().numel() >= 2


def test_all_exit_at_first_stage_never_steps(net, monkeypatch):
    sizes = record_steps(net, monkeypatch)
    x = torch.randn(6, 1, 28, 28)
    output = dynamic_forward(net, forced_policy(net, 1), x, 0.0)
    assert sizes == [] and output.exits.eq(1).all()
    with torch.no_grad():
        torch.testing.assert_close(output.logits, net(x, subnet=1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("allowed", [None, [1, 5]])
def test_fallback_is_static_n_k(net, allowed, monkeypatch):
    """λ = None (always N_K): one static pass of N_K, never the staged path nor the policy; its
    logits are static N_K's and no policy MACs are counted."""
    policy = forced_policy(net, 1)
    if allowed is not None:
        policy.restrict_exits(allowed)
    sizes = record_steps(net, monkeypatch)
    monkeypatch.setattr(net, "start", lambda x: pytest.fail("the staged path ran"))
    monkeypatch.setattr(policy, "plan", lambda *args: pytest.fail("the policy ran"))
    x = torch.randn(5, 1, 28, 28)
    output = dynamic_forward(net, policy, x, None)
    assert sizes == [] and output.static and output.exits.eq(net.num_subnets).all()
    with torch.no_grad():
        assert torch.equal(output.logits, net(x, subnet=net.num_subnets))
    measured = evaluate_dynamic(net, policy, None, [(x, torch.zeros(5, dtype=torch.long))], progress=False)
    assert measured.macs == pytest.approx(net.macs(net.num_subnets)) and measured.saving == pytest.approx(0.0)


@pytest.mark.parametrize("mode", ["sequential", "one_shot"])
def test_measured_accuracy_and_macs_agree_with_the_exits(net, mode):
    generator = torch.Generator().manual_seed(4)
    x, y = torch.randn(20, 1, 28, 28, generator=generator), torch.randint(0, 10, (20,), generator=generator)
    data = [(x[:8], y[:8]), (x[8:], y[8:])]
    policy = spread_policy(net, x, mode=mode)
    measured = evaluate_dynamic(net, policy, 0.3, data, epsilon=0.1, progress=False)
    outputs = collect_exit_outputs(net, data, progress=False)
    exits = policy.exits(outputs.features, outputs.statistics, 0.3)
    expected = evaluate_exits(exits, outputs, exit_macs(net), "policy", extra_macs=policy.decision_macs(exits))
    assert measured.accuracy == pytest.approx(expected.accuracy)
    assert measured.top5 == pytest.approx(expected.top5)
    assert measured.macs == pytest.approx(expected.macs)
    assert measured.exit_fractions == pytest.approx(expected.exit_fractions)
    assert measured.epsilon == 0.1 and measured.parameter == 0.3


def test_policy_of_another_network_is_rejected(net):
    other = ExitPolicy(net.heads[0].in_features, [0.5, 0.0])
    with pytest.raises(ValueError, match="sub-networks"):
        dynamic_forward(net, other, torch.randn(2, 1, 28, 28), 0.1)


def test_measurement_helpers():
    x = torch.randn(4, 8)
    allocated = 1_000_000 * 4  # bytes of a (1e6,) float32 temporary

    def allocate(batch):
        return torch.ones(1_000_000) + batch.sum()

    assert measure_peak_memory(allocate, x) >= allocated
    assert measure_throughput(allocate, x, repeats=2) > 0
    result = measure("ones", allocate, x, repeats=1)
    assert result.batch_size == 4 and result.peak_bytes >= allocated
    with pytest.raises(ValueError, match="repeats"):
        measure_throughput(allocate, x, repeats=0)


def test_throughputs_interleave_the_runs():
    calls: list[str] = []
    speeds = measure_throughputs({"a": lambda b: calls.append("a"), "b": lambda b: calls.append("b")},
                                 torch.zeros(3), repeats=3, warmup=1)  # fmt: skip
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert set(speeds) == {"a", "b"} and all(speed > 0 for speed in speeds.values())
