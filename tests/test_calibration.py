"""Risk-controlled calibration (rdn.calibration): the p-value, the fixed-sequence walk, and the
guarantee itself checked by Monte Carlo on synthetic exits whose disagreement rates are known."""

import math

import pytest
import torch

import rdn.calibration as calibration
from rdn.calibration import (
    RiskControl,
    binomial_p_value,
    calibrate_confidence_consistency,
    calibrate_consistency,
    check_risk_level,
    fixed_sequence_test,
)
from rdn.policy import ExitOutputs, ExitPolicy, fit_policy

# Synthetic exits (K = 3): exit s ∈ {1, 2} has confidence u_s ~ U(0, 1), independent; the confidence
# rule with threshold τ exits at the first s with u_s ≥ τ. Exit s disagrees with N_K with probability
# P_DISAGREE[s − 1], independently of everything else. So the true risk at τ is known exactly:
#   risk(τ) = (1 − τ)·p_1 + τ(1 − τ)·p_2,  and the MAC saving is (1 − τ)·r_1 + τ(1 − τ)·r_2.
P_DISAGREE = (0.02, 0.005, 0.0)
SAVINGS = torch.tensor([0.6, 0.3, 0.0], dtype=torch.float64)
DELTA, ALPHA = 0.01, 0.1


def true_risk(tau: float | None) -> float:
    if tau is None:
        return 0.0
    return (1 - tau) * P_DISAGREE[0] + tau * (1 - tau) * P_DISAGREE[1]


def known_outputs(n: int, generator: torch.Generator) -> ExitOutputs:
    """n samples of the synthetic exits above (labels and correctness are not read by the calibration)."""
    confidence = torch.rand(n, 3, generator=generator)
    confidence[:, -1] = 1.0
    disagree = torch.rand(n, 3, generator=generator) < torch.tensor(P_DISAGREE)
    final = torch.randint(0, 10, (n,), generator=generator)
    predictions = torch.where(disagree, (final[:, None] + 1) % 10, final[:, None])  # another class where disagreeing
    statistics = torch.stack([confidence, confidence, 1 - confidence], dim=-1)
    correct = predictions == final[:, None]
    return ExitOutputs(torch.zeros(n, 1), correct, correct, statistics, final, predictions)


def coverage(draws: int, n: int, steps: int = 50, seed: int = 0) -> tuple[float, float]:
    """(fraction of draws whose chosen τ has true risk > δ, mean true saving of the chosen τ)."""
    generator = torch.Generator().manual_seed(seed)
    violations, saving = 0, 0.0
    for _ in range(draws):
        result = calibrate_confidence_consistency(known_outputs(n, generator), DELTA, ALPHA, SAVINGS, steps=steps)
        violations += true_risk(result.parameter) > DELTA
        tau = result.parameter
        saving += 0.0 if tau is None else (1 - tau) * SAVINGS[0].item() + tau * (1 - tau) * SAVINGS[1].item()
    return violations / draws, saving / draws


def test_the_guarantee_holds_on_exits_with_known_disagreement_rates():
    """Over 500 independent calibration draws of n = 2000, the chosen τ's true risk exceeds δ in at
    most α of them (+ Monte-Carlo slack: 3 standard errors of a rate α over 500 draws ≈ 0.04), and the
    choice is not trivially conservative: it saves MACs (the true risk allows ~25 %)."""
    violated, saving = coverage(draws=500, n=2000)
    print(f"violations {violated:.3f} (alpha {ALPHA}), mean saving {saving:.3f}")
    assert violated <= ALPHA + 0.04
    assert saving > 0.1


def test_the_coverage_check_catches_a_broken_p_value(monkeypatch):
    """With the "empirical risk ≤ δ" rule in place of the p-value, the same check fails: the
    guarantee test has power against the mistake the issue describes."""
    monkeypatch.setattr(calibration, "binomial_p_value", lambda losses, n, delta: 0.0 if losses <= n * delta else 1.0)
    violated, _ = coverage(draws=200, n=2000)
    assert violated > ALPHA + 0.04


def test_binomial_p_value_against_a_direct_sum():
    n, delta = 40, 0.1
    for losses in (0, 3, 10, 40):
        direct = sum(math.comb(n, i) * delta**i * (1 - delta) ** (n - i) for i in range(losses + 1))
        assert binomial_p_value(losses, n, delta) == pytest.approx(direct, rel=1e-9)
    assert binomial_p_value(0, 10_000, 0.005) == pytest.approx(math.exp(10_000 * math.log1p(-0.005)), rel=1e-9)
    assert binomial_p_value(3, 10, 0.0) == 1.0  # H0 "risk > 0" is never rejected
    with pytest.raises(ValueError):
        binomial_p_value(11, 10, 0.1)


def test_fixed_sequence_stops_at_the_first_failure():
    n = 1000
    zeros, many = torch.zeros(n, dtype=torch.bool), torch.arange(n) < 100  # risk 0, risk 0.1
    last, p_values = fixed_sequence_test([zeros, zeros, many, zeros], 4, delta=0.01, alpha=0.1)
    assert last == 1 and len(p_values) == 3  # the fourth (risk 0 again) is never tested
    last, _ = fixed_sequence_test([many], 1, delta=0.01, alpha=0.1)
    assert last == -1


@pytest.mark.parametrize(("delta", "alpha", "name"), [(-0.1, 0.1, "delta"), (1.0, 0.1, "delta"), (0.1, 0.0, "alpha"),
                                                      (0.1, 1.0, "alpha"), (math.nan, 0.1, "delta"),
                                                      (0.1, True, "alpha")])  # fmt: skip
def test_bad_risk_levels_are_refused_by_name(delta, alpha, name):
    with pytest.raises(ValueError, match=name):
        check_risk_level(delta, alpha)
    with pytest.raises(ValueError, match=name):
        calibrate_confidence_consistency(known_outputs(50, torch.Generator().manual_seed(0)), delta, alpha)


def test_zero_tolerance_is_always_n_k():
    outputs = known_outputs(500, torch.Generator().manual_seed(1))
    result = calibrate_confidence_consistency(outputs, 0.0, 0.1, SAVINGS)
    assert result.parameter is None and result.risk == 0.0 and result.saving == 0.0 and result.tested == 0
    assert isinstance(result, RiskControl) and "differs from N_K's is <= 0" in result.guarantee


def policy_outputs(n: int, seed: int) -> ExitOutputs:
    """Three exits; exit 1 and 2 agree with N_K when feature 0 is large (the policy can learn where)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 4, generator=generator)
    final = torch.randint(0, 10, (n,), generator=generator)
    agree = features[:, :1] + 0.3 * torch.randn(n, 3, generator=generator) > torch.tensor([0.5, -0.5, -math.inf])
    predictions = torch.where(agree, final[:, None], (final[:, None] + 1) % 10)
    correct = predictions == final[:, None]
    confidence = torch.where(agree, 0.9, 0.4)
    statistics = torch.stack([confidence, confidence - 0.1, 1 - confidence], dim=-1)
    return ExitOutputs(features, correct, correct, statistics, final, predictions)


def test_the_policy_calibrated_on_consistency():
    """A trained policy: the chosen λ's disagreement on held-out data stays near δ, and it saves MACs;
    δ = 0 keeps N_K; outputs without predictions are refused."""
    torch.manual_seed(0)
    policy = ExitPolicy(4, SAVINGS, hidden=8)
    fit_policy(policy, policy_outputs(2000, seed=0), epochs=15, progress=False)
    calib, test = policy_outputs(3000, seed=1), policy_outputs(20000, seed=2)
    macs = torch.tensor([4e5, 7e5, 1e6], dtype=torch.float64)  # the policy MLP: ~200 MACs
    result = calibrate_consistency(policy, calib, delta=0.02, alpha=0.1, macs=macs)
    assert result.parameter is not None and result.saving > 0.2 and result.risk <= 0.02
    assert result.p_value is not None and result.p_value <= 0.1 and result.n == 3000
    exits = policy.exits(test.features, test.statistics, result.parameter)
    held_out = calibration.consistency_losses(test, exits).double().mean().item()
    assert held_out <= 0.02 + 0.005  # one draw; the Monte-Carlo test above checks the rate of misses
    assert calibrate_consistency(policy, calib, delta=0.0).parameter is None
    old = ExitOutputs(calib.features, calib.correct, calib.correct_top5, calib.statistics, calib.labels)
    with pytest.raises(ValueError, match="no per-exit predictions"):
        calibrate_consistency(policy, old, delta=0.02)
    assert ExitOutputs.from_state_dict(old.state_dict()).predictions is None  # older files still load


def test_minimum_samples():
    n = calibration.minimum_samples(0.005, 0.1)
    assert n == 460 and binomial_p_value(0, n, 0.005) <= 0.1 < binomial_p_value(0, n - 1, 0.005)
    assert calibration.minimum_samples(0.0, 0.1) == 0


def test_the_experiment_config_refuses_bad_tolerances_by_name():
    from rdn.config import ConfigError
    from rdn.experiments.config import PRESETS

    assert (PRESETS["default"].tolerance, PRESETS["default"].risk_alpha) == (0.005, 0.1)
    with pytest.raises(ConfigError, match="tolerance"):
        PRESETS["default"].replace(tolerance=1.5)
    with pytest.raises(ConfigError, match="risk_alpha"):
        PRESETS["default"].replace(risk_alpha=0.0)


def test_the_report_states_the_guarantee_and_what_was_achieved():
    from rdn.experiments.report import comparisons

    def point(accuracy, macs, saving=0.0):
        return {"name": "x", "accuracy": accuracy, "macs": macs, "epsilon": None, "parameter": None,
                "saving": saving, "top5": 1.0, "exit_fractions": [1.0]}  # fmt: skip

    def test(accuracy, saving, disagreement):
        return {"accuracy_drop_points": 100 * (0.80 - accuracy), "saving": saving, "disagreement": disagreement,
                "accuracy": accuracy, "macs": 4e6 * (1 - saving)}  # fmt: skip

    controlled = RiskControl("policy", 0.5, 0.005, 0.1, 5000, 0.003, 0.02, 0.6, 40)
    confidence = RiskControl("confidence", 0.9, 0.005, 0.1, 5000, 0.004, 0.05, 0.3, 90)
    evaluation = {
        "static": [point(0.70, 1e6), point(0.80, 4e6)], "base": point(0.81, 2e6),
        "engine": point(0.797, 1.6e6, 0.6), "dynamic": [], "confidence": [],
        "measurements": [{"name": "N_2 static", "batch_size": 8, "images_per_second": 100.0},
                         {"name": "dynamic δ=0.005", "batch_size": 8, "images_per_second": 150.0}],
        "risk_control": {"policy": controlled.to_dict() | {"test": test(0.797, 0.6, 0.004)},
                         "confidence": confidence.to_dict() | {"test": test(0.798, 0.3, 0.0045)},
                         "lambda_star": {"epsilon": 0.202, "parameter": None, "test": test(0.80, -0.001, 0.0)}},
    }  # fmt: skip
    text = "\n".join(comparisons(evaluation))
    assert "operating point (δ = 0.005 tolerated disagreement with N_K at confidence 0.9, λ = 0.5" in text
    assert "differs from N_K's is <= 0.005, so the accuracy drop against N_K is <= 0.5 points" in text
    assert "top-1 79.70 % (-0.30 points against N_K), 60.0 % fewer MACs, 0.40 % of test images" in text
    assert "(within δ)" in text and "λ* = N_K (fallback)): top-1 80.00 % (+0.00 points against N_K)" in text
