"""Risk-controlled calibration of early exits against consistency with N_K (Learn-then-Test).

The loss of a sample is 1 when the exit it takes predicts another class than N_K does on it, 0
otherwise (CALM's "consistency" risk). It needs no labels, and it bounds the accuracy drop against
N_K: a sample N_K classifies correctly and the exit does not is a disagreement, so

    accuracy(N_K) − accuracy(rule) ≤ Pr(rule's prediction ≠ N_K's prediction).

The user states a tolerance δ (the fraction of samples allowed to disagree with N_K) and a
confidence 1 − α. Learn-then-Test (Angelopoulos et al., 2021) with fixed-sequence testing: the
candidate parameters are ordered in advance from the most conservative (always N_K, risk 0) to the
most aggressive; for each, the null hypothesis H0: risk > δ is tested with the exact binomial p-value
P(Binomial(n, δ) ≤ n·r̂) on n calibration samples; the walk goes on while p ≤ α and the last
parameter that passed is returned. Guarantee (finite-sample, no assumption on the rule or on the
monotonicity of the risk along the grid): with probability ≥ 1 − α over the draw of the calibration
samples, the returned parameter's disagreement rate with N_K on the distribution they were drawn
from is ≤ δ.

What data is valid: samples exchangeable with the test samples (drawn i.i.d. from the same
distribution) and not used to train the network or the policy. Labels are not read, so unlabelled
held-out images count. The training split is *not* valid even without its labels: the RDN was
trained on it (its exits agree with N_K more there than on unseen images) and the policy learned
from its exit outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from rdn.policy import ExitOutputs, ExitPolicy, confidence_exits, planned_exits

__all__ = [
    "RiskControl",
    "binomial_p_value",
    "calibrate_confidence_consistency",
    "calibrate_consistency",
    "check_risk_level",
    "consistency_losses",
    "fixed_sequence_test",
    "lambda_grid",
    "minimum_samples",
    "threshold_grid",
]

# Candidates of the fixed sequence, fixed before any data is seen (the test's validity needs that);
# finer grids cost one pass per step, and steps past the first failing one are never tested. The
# confidence rule's τ: a uniform grid of [0, 1]. The policy's λ: geometric from LAMBDA_RANGE[0] down
# to LAMBDA_RANGE[1], then 0. Why geometric: exit k beats N_K where p_k ≥ λ / (λ + r_k), so the
# decisions move in 1 − p_k ~ r_k / λ; a uniform grid of t = λ / (1 + λ) steps from λ = ∞ straight to
# λ = 199 (p_k ≥ 0.996), which on the demo networks already sends 55–62 % of the samples out early, and
# one failed test there ends the walk (a calibration on make demo's seed 1 certified nothing so).
GRID_STEPS = 200
LAMBDA_RANGE = (1e7, 1e-2)


def check_risk_level(delta: float, alpha: float) -> tuple[float, float]:
    """(δ, α) as floats, δ in [0, 1), α in (0, 1); ValueError naming the bad one."""
    for name, value in (("delta", delta), ("alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite float, got {value!r}")
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta (the tolerated fraction of samples disagreeing with N_K) must lie in [0, 1), got "
                         f"{delta}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha (1 - the confidence of the guarantee) must lie in (0, 1), got {alpha}")
    return float(delta), float(alpha)


def minimum_samples(delta: float, alpha: float) -> int:
    """The fewest calibration samples with which any candidate can pass: even zero losses give the
    p-value (1 − δ)^n, which must be ≤ α. Fewer samples always keep N_K (0 for δ = 0: never passes)."""
    delta, alpha = check_risk_level(delta, alpha)
    return 0 if delta == 0 else math.ceil(math.log(alpha) / math.log1p(-delta))


def binomial_p_value(losses: int, n: int, delta: float) -> float:
    """P(Binomial(n, δ) ≤ losses): a valid p-value of H0 "risk > δ" after ``losses`` of n samples erred.

    Under H0 the number of losses stochastically dominates Binomial(n, δ), so this tail is ≤ the
    probability of seeing so few. Summed in log space (exact for any n a split holds).
    """
    if n < 1 or not 0 <= losses <= n:
        raise ValueError(f"need 0 <= losses <= n and n >= 1, got losses={losses}, n={n}")
    if delta <= 0.0:
        return 1.0  # H0 "risk > 0" is never rejected by finitely many samples
    i = torch.arange(losses + 1, dtype=torch.float64)
    log_pmf = (math.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1)
               + i * math.log(delta) + (n - i) * math.log1p(-delta))  # fmt: skip
    return min(1.0, torch.logsumexp(log_pmf, 0).exp().item())


def fixed_sequence_test(losses: Sequence[Tensor] | Callable[[int], Tensor], count: int, delta: float,
                        alpha: float) -> tuple[int, list[float]]:  # fmt: skip
    """Fixed-sequence testing of H0_j "risk_j > δ" for j = 0..count−1, in that order.

    Args:
        losses: ``losses[j]`` (or ``losses(j)``) the (N,) bool / {0, 1} losses of candidate j on the
            calibration samples; candidates are evaluated lazily, only as far as the walk goes.
        count: number of candidates.
        delta, alpha: :func:`check_risk_level`.

    Returns (the last index j whose p-value and all before it are ≤ α, or −1 when the first fails;
    the p-values computed). Family-wise error ≤ α: no multiplicity correction is needed because
    the order is fixed and the walk stops at the first non-rejection.
    """
    delta, alpha = check_risk_level(delta, alpha)
    get = losses if callable(losses) else losses.__getitem__
    passed, p_values = -1, []
    for j in range(count):
        loss = get(j)
        p = binomial_p_value(int(loss.sum()), loss.numel(), delta)
        p_values.append(p)
        if p > alpha:
            break
        passed = j
    return passed, p_values


def consistency_losses(outputs: ExitOutputs, exits: Tensor) -> Tensor:
    """(N,) bool: the prediction of the 1-based ``exits`` (N,) differs from N_K's on each sample."""
    predictions = outputs.predictions
    if predictions is None:
        raise ValueError("these exit outputs hold no per-exit predictions (collected by an older version): collect "
                         "them again with rdn.policy.collect_exit_outputs")  # fmt: skip
    rows = torch.arange(outputs.num_samples)
    return predictions[rows, exits.cpu() - 1] != predictions[:, -1]


def lambda_grid(steps: int = GRID_STEPS) -> list[float | None]:
    """The policy's candidates, most conservative first: ``None`` (always N_K), λ = ∞ (the most accurate
    plan), then ``steps`` values of λ geometric from 10^7 down to 10^-2, then 0 (the cheapest)."""
    high, low = (math.log10(value) for value in LAMBDA_RANGE)
    exponents = torch.linspace(high, low, steps, dtype=torch.float64).tolist()
    return [None, math.inf] + [10.0**exponent for exponent in exponents] + [0.0]


def threshold_grid(steps: int = GRID_STEPS) -> list[float | None]:
    """The confidence rule's candidates, most conservative first: ``None`` (always N_K), then τ from 1 to 0."""
    return [None] + torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()


@dataclass(frozen=True)
class RiskControl:
    """The outcome of a risk-controlled calibration.

    Attributes:
        rule: "policy" (parameter λ) or "confidence" (parameter τ).
        parameter: the chosen λ / τ; ``None``: always N_K (no candidate passed, or δ = 0).
        delta: tolerated disagreement rate with N_K.
        alpha: 1 − the confidence of the guarantee.
        n: calibration samples.
        risk: the chosen parameter's disagreement rate on them (0 for always N_K).
        p_value: its p-value (``None`` for always N_K, which is not tested: its risk is 0).
        saving: fraction of N_K's MACs it saved on them (the rule's own MACs included).
        tested: candidates tested (the walk stops at the first failure).
    """

    rule: str
    parameter: float | None
    delta: float
    alpha: float
    n: int
    risk: float
    p_value: float | None
    saving: float
    tested: int

    @property
    def guarantee(self) -> str:
        """The statement the calibration certifies, in words."""
        return (f"with probability >= {1 - self.alpha:g} over the {self.n} calibration samples, the fraction of "
                f"unseen samples (exchangeable with them) whose exit prediction differs from N_K's is <= "
                f"{self.delta:g}, so the accuracy drop against N_K is <= {100 * self.delta:g} points")  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self) | {"guarantee": self.guarantee}


def _calibrate(rule: str, outputs: ExitOutputs, decide: Callable[[float | None], Tensor],
               grid: Sequence[float | None], cost: Callable[[Tensor, float | None], float], delta: float,
               alpha: float) -> RiskControl:  # fmt: skip
    """Learn-then-Test over ``grid`` (``grid[0]`` must be ``None``, always N_K: risk 0, not tested)."""
    delta, alpha = check_risk_level(delta, alpha)
    if grid[0] is not None:
        raise ValueError("the grid must start with None (always N_K)")
    exits: dict[int, Tensor] = {0: decide(None)}

    def losses(j: int) -> Tensor:
        exits[j + 1] = decide(grid[j + 1])
        return consistency_losses(outputs, exits[j + 1])

    last, p_values = fixed_sequence_test(losses, len(grid) - 1, delta, alpha) if delta > 0 else (-1, [])
    chosen = exits[last + 1]
    return RiskControl(
        rule=rule,
        parameter=grid[last + 1],
        delta=delta,
        alpha=alpha,
        n=outputs.num_samples,
        risk=consistency_losses(outputs, chosen).double().mean().item(),
        p_value=p_values[last] if last >= 0 else None,
        saving=cost(chosen, grid[last + 1]),
        tested=len(p_values),
    )


def calibrate_consistency(policy: ExitPolicy, outputs: ExitOutputs, delta: float, alpha: float = 0.1,
                          macs: Tensor | None = None, steps: int = GRID_STEPS) -> RiskControl:  # fmt: skip
    """The most aggressive λ of :func:`lambda_grid` that Learn-then-Test certifies (module docstring).

    Args:
        policy: a trained :class:`~rdn.policy.ExitPolicy` (its allowed exits and mode as they will run).
        outputs: calibration outputs with per-exit predictions; labels are not read. They must be
            exchangeable with the test data and unused by the training of the network and the policy.
        delta: tolerated disagreement rate with N_K, in [0, 1) (0: always N_K).
        alpha: the guarantee holds with probability ≥ 1 − α, in (0, 1).
        macs: (K,) MACs of N_1..N_K (:func:`~rdn.policy.exit_macs`): the reported saving then counts
            the policy's own MACs; without it, the saving is that of the exits alone (from r_k).
        steps: grid steps of λ between 10^7 and 10^-2 (lambda_grid).
    """
    policy.check_outputs(outputs)
    device = policy.feature_mean.device
    with torch.no_grad():
        probabilities = policy.stage_probabilities(outputs.features.to(device), outputs.statistics.to(device)).cpu()
    savings, allowed, stages = policy.savings.cpu(), policy.allowed.cpu(), policy.planning_stages().cpu()

    def cost(exits: Tensor, lam: float | None) -> float:
        if macs is None:
            return savings[exits - 1].mean().item()
        spent = macs.cpu().double()[exits - 1] + policy.rule_macs(exits, lam)
        return 1.0 - spent.mean().item() / macs[-1].item()

    return _calibrate("policy", outputs, lambda lam: planned_exits(probabilities, savings, lam, allowed, stages),
                      lambda_grid(steps), cost, delta, alpha)  # fmt: skip


def calibrate_confidence_consistency(
    outputs: ExitOutputs, delta: float, alpha: float = 0.1, savings: Tensor | None = None, steps: int = GRID_STEPS
) -> RiskControl:
    """The max-softmax baseline calibrated the same way: the smallest τ of :func:`threshold_grid`
    that Learn-then-Test certifies. ``savings`` (K,) r_k gives the reported saving (else 0)."""
    savings = torch.zeros(outputs.num_exits, dtype=torch.float64) if savings is None else savings.cpu().double()

    def cost(exits: Tensor, tau: float | None) -> float:
        return savings[exits - 1].mean().item()

    return _calibrate("confidence", outputs, lambda tau: confidence_exits(outputs.confidence, tau),
                      threshold_grid(steps), cost, delta, alpha)  # fmt: skip
