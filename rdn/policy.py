"""Exit policy and accuracy–complexity calibration (DESIGN.md §7, paper §3.4).

A small MLP predicts, for every exit k = 1..K, p_k(x) ≈ Pr(N_k classifies x correctly) from
what is known at stage s: the pooled features of the first sub-network N_1 and (sequential mode)
the softmax statistics (max probability, top-1 − top-2 margin, normalised entropy) of the exits
N_1..N_s already computed. With r_k the fraction of N_K's MACs saved by stopping at N_k (r_K = 0), the
Lagrangian of the paper's eq. 3 gives, for a fixed λ ≥ 0, the plan

    plan_s(x) = argmax_{k ≥ s} (r_k + λ) · p_k(x | stage s)

λ = 0 maximises the expected saving alone, λ → ∞ the predicted accuracy alone. p_k is learned for
one of two targets:

- ``"agreement"`` (the default): p_k(x) ≈ Pr(N_k predicts the class N_K predicts), learned without
  labels, with p_K = 1 by construction. Then λ = ∞ is exactly "always N_K" and lowering λ lets
  samples leave early in order of predicted agreement: the rule moves continuously away from N_K,
  which is what the risk-controlled calibration against consistency with N_K (:mod:`rdn.calibration`)
  walks along. Measured on the pipeline's Fashion-MNIST RDN: docs/design.md.
- ``"correctness"`` (the paper's): p_k(x) ≈ Pr(N_k classifies x correctly). At λ = ∞ it already sends
  every sample whose early exit looks as likely correct as N_K to that exit (71 % of the images, 1.3 %
  of them predicted differently from N_K, on the same RDN), so a calibration that tolerates less
  disagreement than that certifies nothing but N_K.

Two modes:

- ``"sequential"`` (the default: fewer MACs near N_K's accuracy, see :class:`ExitPolicy`): the plan
  is made again at every exit the rule may take, with that exit's statistics; a sample stops at
  N_s when plan_s(x) = s, i.e. it goes on while max_{k>s} (r_k + λ)·p_k(x) > (r_s + λ)·p_s(x).
- ``"one_shot"`` (the paper's rule): plan_1 is made once at N_1, from N_1's features only, and followed.

For a target accuracy 1 − ε, a binary search on a calibration split finds the smallest λ* whose
accuracy reaches the target; the (ε, λ*) pairs are stored in the policy (``state_dict`` extra
state, and :meth:`ExitPolicy.calibration_json`). The baseline is the MSDNet-style confidence
rule: exit at the first k whose max softmax ≥ τ, τ calibrated by the same search.

Everything here works on :class:`ExitOutputs`, the per-sample outputs of all exits collected in
one pass of N_K over a split; :mod:`rdn.inference` runs the chosen exits for real.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MODES",
    "STATISTICS",
    "TARGETS",
    "ExitOutputs",
    "ExitPolicy",
    "OperatingPoint",
    "calibrate_confidence",
    "calibrate_lambda",
    "capture_first_features",
    "check_epsilon",
    "collect_exit_outputs",
    "confidence_exits",
    "evaluate_exits",
    "exit_macs",
    "exit_savings",
    "first_feature_width",
    "fit_policy",
    "lagrangian_exits",
    "planned_exits",
    "softmax_statistics",
]

# What :func:`softmax_statistics` gives per exit, in order.
STATISTICS = ("confidence", "margin", "entropy")
# Decision modes of :class:`ExitPolicy`.
MODES = ("sequential", "one_shot")
# What :class:`ExitPolicy` learns p_k(x) of: exit k agrees with N_K's prediction, or is correct.
TARGETS = ("agreement", "correctness")
# In agreement mode p_K = 1 by construction and every other p_k is kept below it, so that the rule at
# λ = ∞ (score p_k) is exactly "always N_K" even where the sigmoid saturates to 1 in float32.
_BELOW_ONE = 1.0 - 1e-6

# Bisection steps of the calibration searches: the parameter lives in [0, 1], 2^-40 is far below
# any change of a decision that float32 probabilities can express.
_SEARCH_STEPS = 40


# ----------------------------------------------------------------------------------------------
# Per-sample outputs of every exit
# ----------------------------------------------------------------------------------------------


@dataclass
class ExitOutputs:
    """What every exit of an RDN does on one split (N samples, K exits).

    Attributes:
        features: (N, F_1) float32, the pooled features of N_1 (what N_1's head and the policy read).
        correct: (N, K) bool, exit k's top-1 prediction is the label.
        correct_top5: (N, K) bool, the label is in exit k's top 5 (top-C when C < 5 classes).
        statistics: (N, K, 3) float32, exit k's :func:`softmax_statistics` (max probability, margin,
            normalised entropy).
        labels: (N,) int64.
        predictions: (N, K) int64, exit k's top-1 class (what consistency with N_K is measured on,
            :mod:`rdn.calibration`); ``None`` in outputs collected before it was recorded.
    """

    features: Tensor
    correct: Tensor
    correct_top5: Tensor
    statistics: Tensor
    labels: Tensor
    predictions: Tensor | None = None

    def __post_init__(self) -> None:
        n, k = self.correct.shape if self.correct.dim() == 2 else (None, None)
        if n is None:
            raise ValueError(f"correct must be (N, K), got shape {tuple(self.correct.shape)}")
        if tuple(self.correct_top5.shape) != (n, k):
            raise ValueError(f"correct_top5 must be (N, K) = {(n, k)}, got {tuple(self.correct_top5.shape)}")
        if tuple(self.statistics.shape) != (n, k, len(STATISTICS)):
            raise ValueError(f"statistics must be (N, K, {len(STATISTICS)}) = {(n, k, len(STATISTICS))}, got "
                             f"{tuple(self.statistics.shape)}")
        if self.features.dim() != 2 or self.features.shape[0] != n:
            raise ValueError(f"features must be (N={n}, F_1), got {tuple(self.features.shape)}")
        if tuple(self.labels.shape) != (n,):
            raise ValueError(f"labels must be (N={n},), got {tuple(self.labels.shape)}")
        if self.predictions is not None and tuple(self.predictions.shape) != (n, k):
            raise ValueError(f"predictions must be (N, K) = {(n, k)}, got {tuple(self.predictions.shape)}")

    @property
    def num_samples(self) -> int:
        return self.correct.shape[0]

    @property
    def num_exits(self) -> int:
        return self.correct.shape[1]

    @property
    def feature_width(self) -> int:
        return self.features.shape[1]

    @property
    def confidence(self) -> Tensor:
        """(N, K) every exit's max softmax probability."""
        return self.statistics[..., 0]

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors (``torch.save`` / ``torch.load(weights_only=True)`` round trip)."""
        return {name: value for name, value in asdict(self).items() if value is not None}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> ExitOutputs:
        names = {f.name for f in fields(cls)}
        # Outputs collected before predictions were recorded still load (without them).
        if set(state) not in (names, names - {"predictions"}):
            raise ValueError(f"an ExitOutputs state needs exactly the keys {sorted(names)}, got {sorted(state)} "
                             "(outputs collected by an older version: collect them again)")
        return cls(**state)


def first_feature_width(net: nn.Module) -> int:
    """F_1, the width of N_1's pooled features (:func:`capture_first_features`)."""
    if net.exits[0][1] == 0:  # a shallow N_1 (depth split): its alignment block's pooled output
        return net.classifier.in_features
    return net.heads[0].in_features


@contextlib.contextmanager
def capture_first_features(net: nn.Module) -> Iterator[list[Tensor]]:
    """Record the pooled features (N, F_1) of N_1 every time the RDN computes N_1's logits.

    N_1's head reads exactly them, in the one-pass ``forward(x)``, in ``forward(x, subnet=1)``
    and in ``start(x)`` alike, so a forward hook is the one place to read them: the input of
    ``net.heads[0]`` (the pooled feature prefix), or with a depth split whose first exit is
    shallow, the output of ``net.depth_heads[0]`` (its alignment block, pooled). Yields the list
    the captured tensors are appended to.
    """
    captured: list[Tensor] = []
    if net.exits[0][1] == 0:
        handle = net.depth_heads[0].register_forward_hook(lambda module, args, output: captured.append(output))
    else:
        handle = net.heads[0].register_forward_hook(lambda module, args, output: captured.append(args[0]))
    try:
        yield captured
    finally:
        handle.remove()


def softmax_statistics(logits: Tensor) -> Tensor:
    """(..., C) logits, C ≥ 2 → (..., 3) float32: max softmax, top-1 − top-2 probability, entropy / log C."""
    if logits.dim() < 1 or logits.shape[-1] < 2:
        raise ValueError(f"logits must be (..., C) with C >= 2 classes, got shape {tuple(logits.shape)}")
    probabilities = logits.float().softmax(-1)
    top = probabilities.topk(2, dim=-1).values
    entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(-1) / math.log(logits.shape[-1])
    return torch.stack([top[..., 0], top[..., 0] - top[..., 1], entropy], dim=-1)


def _batches(data: Iterable, device: torch.device | None) -> Iterator[tuple[Tensor, Tensor]]:
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("data must yield (input, target) pairs")
        x, y = batch[0], batch[1]
        yield (x, y) if device is None else (x.to(device), y.to(device))


@torch.no_grad()
def collect_exit_outputs(
    net: nn.Module, data: Iterable, device: torch.device | str | None = None, progress: bool = True
) -> ExitOutputs:
    """Run N_K once per batch (every exit's logits from one pass) and keep what the policy needs.

    Args:
        net: a :class:`rdn.surgery.RussianDollNet`; run in eval mode (restored afterwards).
        data: an iterable of (input (B, C, H, W), target (B,)) batches, e.g. a DataLoader.
        device: where to run; default: where the batches are.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    device = None if device is None else torch.device(device)
    was_training = net.training
    net.eval()
    parts: dict[str, list[Tensor]] = {f.name: [] for f in fields(ExitOutputs)}
    try:
        with capture_first_features(net) as captured:
            for x, y in tqdm(_batches(data, device), desc="exit outputs", disable=not progress, leave=False):
                captured.clear()
                logits = torch.stack(net(x), dim=1).float()  # (B, K, C)
                top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
                parts["features"].append(captured[0].float().cpu())
                parts["correct"].append((top[..., 0] == y[:, None]).cpu())
                parts["correct_top5"].append((top == y[:, None, None]).any(-1).cpu())
                parts["statistics"].append(softmax_statistics(logits).cpu())
                parts["labels"].append(y.cpu())
                parts["predictions"].append(top[..., 0].cpu())
    finally:
        net.train(was_training)
    if not parts["labels"]:
        raise ValueError("data yielded no batches")
    return ExitOutputs(**{name: torch.cat(chunks) for name, chunks in parts.items()})


# ----------------------------------------------------------------------------------------------
# Costs
# ----------------------------------------------------------------------------------------------


def exit_macs(net: nn.Module) -> Tensor:
    """(K,) float64 MACs per sample of N_1..N_K (``net.macs(k)``)."""
    return torch.tensor([float(net.macs(k)) for k in range(1, net.num_subnets + 1)], dtype=torch.float64)


def exit_savings(net: nn.Module) -> Tensor:
    """(K,) float64 r_k = 1 − macs(k) / macs(K): the fraction of N_K's MACs saved by exiting at N_k."""
    macs = exit_macs(net)
    return 1.0 - macs / macs[-1]


def check_epsilon(epsilon: float) -> float:
    """ε as a float in the open interval (0, 1) (target accuracy 1 − ε), else ValueError."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
        raise TypeError(f"epsilon must be a float in (0, 1), got {epsilon!r}")
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must lie in the open interval (0, 1) (target accuracy 1 - epsilon), got {epsilon}")
    return float(epsilon)


# ----------------------------------------------------------------------------------------------
# Exit rules
# ----------------------------------------------------------------------------------------------


def lagrangian_exits(
    probabilities: Tensor, savings: Tensor, lam: float | None, allowed: Tensor | None = None
) -> Tensor:
    """exit(x) = argmax_k (r_k + λ)·p_k(x), 1-based (N,) int64; ties go to the cheaper exit.

    Args:
        probabilities: (N, K) p_k(x).
        savings: (K,) r_k.
        lam: λ ≥ 0, or ``None`` for the fall-back "always N_K".
        allowed: (K,) bool, the exits the rule may choose (default all; e.g. the nesting order's).
    """
    n, k = probabilities.shape
    if lam is None:
        return torch.full((n,), k, dtype=torch.long, device=probabilities.device)
    if not lam >= 0.0:
        raise ValueError(f"lam must be >= 0 (or None for always N_K), got {lam}")
    # (r + λ)·p scaled by 1 / (1 + λ) = ((1 − t)·r + t)·p with t = λ / (1 + λ): the same argmax,
    # and finite in float64 for any λ the calibration can return.
    t = 1.0 if math.isinf(lam) else lam / (1.0 + lam)
    scores = ((1.0 - t) * savings.to(probabilities.device, torch.float64) + t) * probabilities.double()
    if allowed is not None:
        scores = scores.masked_fill(~allowed.to(scores.device), -math.inf)
    return scores.argmax(dim=1) + 1


def planned_exits(
    stage_probabilities: Tensor, savings: Tensor, lam: float | None, allowed: Tensor, replan: Tensor
) -> Tensor:
    """Exits of the stage-by-stage rule, 1-based (N,) int64.

    At stage s = 1 and at every later stage with ``replan[s-1]``, a sample still running plans
    argmax over the allowed k ≥ s of (r_k + λ)·p_k(x | stage s) (:func:`lagrangian_exits`); it
    stops at the first stage its current plan names.

    Args:
        stage_probabilities: (N, K, K), row s − 1: the p_k(x) estimated at stage s (only the
            rows of planning stages are read).
        savings: (K,) r_k.
        lam: λ ≥ 0, or ``None`` for "always N_K".
        allowed: (K,) bool, exits the rule may take (including the last).
        replan: (K,) bool, stages after the first where the plan is made again.
    """
    n, k, _ = stage_probabilities.shape
    allowed = allowed.to(stage_probabilities.device)
    exits = torch.full((n,), k, dtype=torch.long, device=stage_probabilities.device)
    done = torch.zeros(n, dtype=torch.bool, device=stage_probabilities.device)
    plan = exits
    for stage in range(1, k + 1):
        if stage == 1 or bool(replan[stage - 1]):
            ahead = allowed.clone()
            ahead[: stage - 1] = False
            plan = torch.where(done, plan, lagrangian_exits(stage_probabilities[:, stage - 1], savings, lam, ahead))
        stop = ~done & (plan == stage)
        exits[stop] = stage
        done |= stop
    return exits


def confidence_exits(confidence: Tensor, threshold: float | None) -> Tensor:
    """The first exit k whose max softmax is ≥ τ (the last exit otherwise), 1-based (N,) int64.

    Args:
        confidence: (N, K) max softmax of every exit.
        threshold: τ, or ``None`` for "always N_K".
    """
    n, k = confidence.shape
    if threshold is None:
        return torch.full((n,), k, dtype=torch.long, device=confidence.device)
    confident = confidence >= threshold
    confident[:, -1] = True
    return confident.int().argmax(dim=1) + 1  # argmax returns the first maximal index


def _smallest_passing(decide: Callable[[float], Tensor], correct: Tensor, target: float) -> float | None:
    """Smallest t in [0, 1] whose exits decide(t) reach accuracy ≥ target on ``correct`` (N, K).

    One bisection, assuming accuracy grows with t (it does for both rules up to ties); ``None``
    when even t = 1 misses the target.
    """
    rows = torch.arange(correct.shape[0])

    def accuracy(t: float) -> float:
        return correct[rows, decide(t) - 1].double().mean().item()

    if accuracy(0.0) >= target:
        return 0.0
    if accuracy(1.0) < target:
        return None
    low, high = 0.0, 1.0
    for _ in range(_SEARCH_STEPS):
        middle = 0.5 * (low + high)
        if accuracy(middle) >= target:
            high = middle
        else:
            low = middle
    return high


def _unreachable(epsilon: float, what: str, correct: Tensor) -> None:
    last = correct[:, -1].double().mean().item()
    reach = "N_K reaches it" if last >= 1.0 - epsilon else f"not even N_K does (accuracy {last:.4f})"
    warnings.warn(
        f"epsilon={epsilon}: no {what} reaches accuracy {1.0 - epsilon:.4f} on the calibration split "
        f"({reach}); falling back to always exiting at N_K",
        RuntimeWarning,
        stacklevel=3,
    )


def calibrate_confidence(outputs: ExitOutputs, epsilon: float) -> float | None:
    """Smallest max-softmax threshold τ whose confidence-rule accuracy on ``outputs`` is ≥ 1 − ε.

    ``None`` (always N_K) with a warning when no τ in [0, 1] reaches it.
    """
    epsilon = check_epsilon(epsilon)
    tau = _smallest_passing(lambda t: confidence_exits(outputs.confidence, t), outputs.correct, 1.0 - epsilon)
    if tau is None:
        _unreachable(epsilon, "confidence threshold", outputs.correct)
    return tau


# ----------------------------------------------------------------------------------------------
# The policy network
# ----------------------------------------------------------------------------------------------


class MemberLinear(nn.Module):
    """``members`` independent linear maps, one per ensemble member: (N, M·in) or (N, M, in) →
    (N, M, out), member m reading only its own slice.

    Weight (M, out, in), bias (M, out). A one-member state saved by an rdn whose policy was a single
    MLP (nn.Linear: weight (out, in), bias (out,)) loads as member 0."""

    def __init__(self, members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.members, self.in_features, self.out_features = members, in_features, out_features
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's initialisation, member by member
        self.weight = nn.Parameter(torch.empty(members, out_features, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(members, out_features).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], self.members, self.in_features)
        return torch.einsum("nmi,moi->nmo", x, self.weight) + self.bias

    def extra_repr(self) -> str:
        return f"members={self.members}, in_features={self.in_features}, out_features={self.out_features}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name, dims in (("weight", 2), ("bias", 1)):
            key = prefix + name
            if self.members == 1 and key in state_dict and state_dict[key].dim() == dims:
                state_dict[key] = state_dict[key].unsqueeze(0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ExitPolicy(nn.Module):
    """MLP on what is known at stage s → K logits of Pr(N_k is correct), plus the λ calibration.

    Input: N_1's standardised pooled features (F_1); in sequential mode also the
    :func:`softmax_statistics` of exits 1..s with zeros for the exits not computed yet (3K) and
    which exits are known (K).

    Args:
        feature_width: F_1, the width of N_1's pooled features (:func:`first_feature_width`).
        savings: (K,) r_k, see :func:`exit_savings`.
        hidden: width of the two hidden layers. The default 16 is what generalised on the
            pipeline's Fashion-MNIST RDN (5k training samples, 3 seeds): at λ → ∞ the rule reached
            86.7–86.9 % on the calibration split with 16 against 86.1–86.4 % with 32 or 64 — wider
            MLPs over-fit and never reached N_K's accuracy (86.9 %), so ε near N_K's error fell back to N_K.
        target: ``"agreement"`` (default) or ``"correctness"`` (module docstring).
        mode: ``"sequential"`` (default): plan again at every exit the rule may take, stop when the
            plan names the current exit; ``"one_shot"``: the paper's rule, plan once at N_1 from
            its features. Measured on a CPU-trained Fashion-MNIST RDN (MobileNetV2 0.25, k = 4,
            N_K 73.7 %; policy on 5k train, λ* on 5k calib, 10k test): sequential needs 4–5 % fewer
            MACs than one-shot at the accuracies within 1 point of N_K's (where the pipeline
            operates) and reaches N_K's test accuracy at 44 % of its MACs, which one-shot does not;
            1–6 % more 2–3 points below. Both need 25–50 % fewer MACs than the max-softmax baseline
            at every accuracy measured.
        members: MLPs fitted one by one, each from its own initialisation and data order (a deep
            ensemble); p_k(x) is their mean. Why 3 by default: on make demo's three Fashion-MNIST
            RDNs one MLP's certified test saving at δ = 0.005 spread 1.5–2.6 points over 4
            initialisations per network, three members' 0.6–2.1, at similar means (docs/design.md).
            Their MACs are counted.

    Buffers ``feature_mean`` / ``feature_scale`` standardise the features (set by :func:`fit_policy`),
    ``allowed`` (K,) marks the exits the rule may pick (:meth:`restrict_exits`, e.g. to the nesting order);
    the mode, the target and the (ε, λ*) pairs (:attr:`lambdas`) travel in the ``state_dict`` as extra state.
    """

    def __init__(
        self,
        feature_width: int,
        savings: Sequence[float] | Tensor,
        hidden: int = 16,
        mode: str = "sequential",
        target: str = "agreement",
        members: int = 3,
    ) -> None:
        super().__init__()
        for name, value in (("feature_width", feature_width), ("hidden", hidden), ("members", members)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        savings = torch.as_tensor(savings, dtype=torch.float64).flatten()
        if savings.numel() < 1 or not bool(((savings >= 0) & (savings <= 1)).all()):
            raise ValueError(f"savings must be K >= 1 values r_k in [0, 1], got {savings.tolist()}")
        self.mode = _check_mode(mode)
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.target = target
        num_exits = savings.numel()
        self.members, self.hidden = members, hidden
        self.register_buffer("savings", savings)
        self.register_buffer("feature_mean", torch.zeros(feature_width))
        self.register_buffer("feature_scale", torch.ones(feature_width))
        self.register_buffer("allowed", torch.ones(num_exits, dtype=torch.bool))
        # One-shot reads N_1's features only: N_1's softmax statistics beside them measured no better.
        statistics_width = (len(STATISTICS) + 1) * num_exits if mode == "sequential" else 0
        # The members' first layers side by side in one nn.Linear (they read the same input), then
        # each member's own layers.
        self.mlp = nn.Sequential(
            nn.Linear(feature_width + statistics_width, members * hidden),
            nn.ReLU(),
            MemberLinear(members, hidden, hidden),
            nn.ReLU(),
            MemberLinear(members, hidden, num_exits),
        )
        self.lambdas: dict[float, float | None] = {}

    @classmethod
    def for_network(cls, net: nn.Module, hidden: int = 16, mode: str = "sequential", target: str = "agreement",
                    members: int = 3) -> ExitPolicy:  # fmt: skip
        """A policy sized for ``net`` (a RussianDollNet): F_1 from N_1's head, r_k from ``net.macs``."""
        return cls(first_feature_width(net), exit_savings(net), hidden, mode, target, members)

    @staticmethod
    def architecture_of(state: dict[str, Tensor]) -> dict[str, int]:
        """``{"hidden": ..., "members": ...}`` of the policy whose ``state_dict`` is ``state`` (a
        state saved before ensembles, with 2-D weights, is one member); KeyError if it is none."""
        weight = state["mlp.2.weight"]
        return {"hidden": int(weight.shape[-1]), "members": int(weight.shape[0]) if weight.dim() == 3 else 1}

    def member(self, member: int) -> ExitPolicy:
        """A one-member copy of member ``member`` of the ensemble (with this policy's buffers and settings)."""
        single = ExitPolicy(self.feature_width, self.savings, self.hidden, self.mode, self.target, members=1)
        single = single.to(self.feature_mean.device)
        with torch.no_grad():
            for mine, theirs in zip(_member_parameters(single, 0), _member_parameters(self, member), strict=True):
                mine.copy_(theirs)
        single.load_state_dict({name: value for name, value in self.state_dict().items()
                                if not name.startswith("mlp.")}, strict=False)  # fmt: skip
        return single

    def set_member(self, member: int, single: ExitPolicy) -> None:
        """Member ``member``'s weights, and the feature standardisation, from the one-member ``single``
        (e.g. one :meth:`member` returned and :func:`fit_policy` trained)."""
        if single.members != 1 or single.hidden != self.hidden or single.feature_width != self.feature_width \
                or single.mode != self.mode:  # fmt: skip
            raise ValueError(f"single must be a one-member policy of this one's sizes and mode ({self.hidden} hidden, "
                             f"{self.feature_width} features, {self.mode}), got {single.members} members, "
                             f"{single.hidden} hidden, {single.feature_width} features, {single.mode}")  # fmt: skip
        with torch.no_grad():
            for mine, theirs in zip(_member_parameters(self, member), _member_parameters(single, 0), strict=True):
                mine.copy_(theirs)
            self.feature_mean.copy_(single.feature_mean)
            self.feature_scale.copy_(single.feature_scale)

    @property
    def feature_width(self) -> int:
        return self.feature_mean.numel()

    @property
    def num_exits(self) -> int:
        return self.savings.numel()

    def restrict_exits(self, exits: Sequence[int]) -> None:
        """Let the rule pick only the 1-based ``exits`` (which must include the last, K)."""
        chosen = sorted(set(exits))
        if not chosen or chosen[-1] != self.num_exits or chosen[0] < 1:
            raise ValueError(f"exits must be 1-based exits in 1..{self.num_exits} including {self.num_exits}, got "
                             f"{exits}")
        self.allowed.zero_()
        self.allowed[torch.tensor(chosen) - 1] = True

    def planning_stages(self) -> Tensor:
        """(K,) bool: the stages where the policy runs (N_1, and in sequential mode every allowed exit)."""
        stages = self.allowed.clone() if self.mode == "sequential" else torch.zeros_like(self.allowed)
        stages[0] = True
        return stages

    def macs(self) -> int:
        """Multiply-accumulates of one policy evaluation (its linear layers)."""
        return sum(getattr(layer, "members", 1) * layer.in_features * layer.out_features for layer in self.mlp
                   if isinstance(layer, (nn.Linear, MemberLinear)))

    def decision_macs(self, exits: Tensor) -> Tensor:
        """(N,) float64 MACs the policy spent on samples leaving at the 1-based ``exits`` (N,): one
        evaluation per planning stage up to the exit."""
        evaluations = self.planning_stages().cpu().long().cumsum(0)
        return evaluations[exits.cpu() - 1].double() * self.macs()

    def rule_macs(self, exits: Tensor, lam: float | None) -> Tensor:
        """(N,) float64 MACs the rule at λ spends on samples leaving at ``exits``: none for ``None``
        (always N_K: the engine runs static N_K without the policy), else :meth:`decision_macs`."""
        if lam is None:
            return torch.zeros(exits.shape[0], dtype=torch.float64)
        return self.decision_macs(exits)

    def check_outputs(self, outputs: ExitOutputs) -> None:
        """ValueError unless ``outputs`` come from a network with this policy's exits and feature width."""
        if outputs.num_exits != self.num_exits or outputs.feature_width != self.feature_width:
            raise ValueError(
                f"the data has {outputs.num_exits} exits and {outputs.feature_width}-wide N_1 features, but this "
                f"policy was built for {self.num_exits} exits and {self.feature_width}-wide features: the data "
                "comes from another model"
            )

    def check_network(self, net: nn.Module) -> None:
        """ValueError unless ``net`` has this policy's number of exits and N_1 feature width."""
        if net.num_subnets != self.num_exits or first_feature_width(net) != self.feature_width:
            raise ValueError(
                f"the network has {net.num_subnets} sub-networks and {first_feature_width(net)}-wide N_1 features, "
                f"but this policy was built for {self.num_exits} exits and {self.feature_width}-wide features"
            )

    def forward(self, features: Tensor, statistics: Tensor) -> Tensor:
        """(N, F_1) features and (N, s, 3) statistics of exits 1..s → (N, K) logits of Pr(N_k is correct).

        The statistics are read in sequential mode only (checked in both)."""
        if features.dim() != 2 or features.shape[1] != self.feature_width:
            raise ValueError(f"features must be (N, {self.feature_width}), got {tuple(features.shape)}")
        n, k = features.shape[0], self.num_exits
        if statistics.dim() != 3 or statistics.shape[0] != n or not 1 <= statistics.shape[1] <= k \
                or statistics.shape[2] != len(STATISTICS):  # fmt: skip
            raise ValueError(f"statistics must be (N={n}, s in 1..{k}, {len(STATISTICS)}), got "
                             f"{tuple(statistics.shape)}")
        stage = torch.full((n,), statistics.shape[1], dtype=torch.long, device=features.device)
        return self._mean_logit(self.member_logits(features, statistics, stage))

    def member_logits(self, features: Tensor, statistics: Tensor, stage: Tensor) -> Tensor:
        """(N, M, K) logits of every member on (N, F_1) features and (N, s, 3) statistics, row i
        knowing the first ``stage[i]`` ≤ s exits (the rest of its row is ignored): what
        :meth:`forward` runs with every row at stage s, and :func:`fit_policy` with rows of mixed
        stages, so that both feed the MLPs the same input for a row at a given stage."""
        features = (features.to(self.feature_mean) - self.feature_mean) / self.feature_scale  # policy's device, dtype
        if self.mode == "one_shot":
            return self.mlp(features)
        n, k, s = features.shape[0], self.num_exits, statistics.shape[1]
        known = torch.zeros(n, k, len(STATISTICS) + 1, dtype=features.dtype, device=features.device)
        flags = (torch.arange(1, s + 1, device=features.device)[None, :] <= stage.to(features.device)[:, None])
        known[:, :s, :-1] = statistics.to(features) * flags[..., None]
        known[:, :s, -1] = flags.to(features.dtype)
        # Statistics first, then the known flags: (N, 3K + K), exits not computed yet all zero.
        return self.mlp(torch.cat([features, known[..., :-1].flatten(1), known[..., -1]], dim=1))

    @staticmethod
    def _mean_logit(member_logits: Tensor) -> Tensor:
        """(N, M, K) logits of the members → (N, K) logit of their mean probability, in log space
        (a member's sigmoid rounding to exactly 1 must not turn into an infinite logit)."""
        count = math.log(member_logits.shape[1])
        positive = F.logsigmoid(member_logits).logsumexp(1) - count
        negative = F.logsigmoid(-member_logits).logsumexp(1) - count
        return positive - negative

    def probabilities(self, features: Tensor, statistics: Tensor) -> Tensor:
        """(N, F_1), (N, s, 3) → (N, K) p_k(x) estimated at stage s (agreement target: p_K = 1, the
        others < 1)."""
        probabilities = torch.sigmoid(self(features, statistics))
        if self.target == "agreement":
            probabilities = torch.cat([probabilities[:, :-1].clamp(max=_BELOW_ONE),
                                       torch.ones_like(probabilities[:, -1:])], dim=1)  # fmt: skip
        return probabilities

    def plan(self, features: Tensor, statistics: Tensor, lam: float | None) -> Tensor:
        """(N,) 1-based exit ≥ s planned at stage s = ``statistics.shape[1]`` under λ (``None``: N_K)."""
        ahead = self.allowed.clone()
        ahead[: statistics.shape[1] - 1] = False
        return lagrangian_exits(self.probabilities(features, statistics), self.savings, lam, ahead)

    def stage_probabilities(self, features: Tensor, statistics: Tensor) -> Tensor:
        """(N, F_1) features, (N, K, 3) statistics of every exit → (N, K, K): row s − 1 the p_k(x)
        estimated at stage s (zeros at stages where the policy does not run)."""
        stages = self.planning_stages()
        result = torch.zeros(features.shape[0], self.num_exits, self.num_exits, device=self.feature_mean.device)
        for stage in (stages.nonzero().squeeze(1) + 1).tolist():
            result[:, stage - 1] = self.probabilities(features, statistics[:, :stage])
        return result

    def exits(self, features: Tensor, statistics: Tensor, lam: float | None) -> Tensor:
        """(N, F_1), (N, K, 3) statistics of every exit → (N,) 1-based exit of every sample under λ
        (``None``: always N_K), as the stage-by-stage engine would take them."""
        return planned_exits(self.stage_probabilities(features, statistics), self.savings, lam, self.allowed,
                             self.planning_stages())  # fmt: skip

    def lambda_for(self, epsilon: float) -> float | None:
        """The calibrated λ* of ε (``None``: fall back to N_K); KeyError if ε was not calibrated."""
        epsilon = check_epsilon(epsilon)
        if epsilon not in self.lambdas:
            raise KeyError(f"epsilon={epsilon} was not calibrated; calibrated: {sorted(self.lambdas)}")
        return self.lambdas[epsilon]

    def get_extra_state(self) -> dict:
        return {"mode": self.mode, "target": self.target,
                "lambdas": [[epsilon, lam] for epsilon, lam in sorted(self.lambdas.items())]}  # fmt: skip

    def set_extra_state(self, state: dict) -> None:
        target = state.get("target", "correctness")  # policies saved before targets existed learned correctness
        for name, theirs, ours in (("mode", state["mode"], self.mode), ("target", target, self.target)):
            if theirs != ours:
                raise ValueError(f"the state is of a policy with {name}={theirs!r}, this one has {name}={ours!r}: "
                                 f"build it with {name}={theirs!r}")
        self.lambdas = {float(epsilon): (None if lam is None else float(lam)) for epsilon, lam in state["lambdas"]}

    def calibration_json(self) -> str:
        """The (ε, λ*) pairs and the rule's constants as JSON (λ* null = always N_K)."""
        rule = {
            "sequential": "at every allowed exit s: stop iff argmax_{k>=s} (r_k + lambda) * p_k(x | stage s) == s",
            "one_shot": "exit = argmax_k (r_k + lambda) * p_k(x | stage 1)",
        }[self.mode]
        return json.dumps(
            {
                "mode": self.mode,
                "target": self.target,
                "rule": rule,
                "savings": self.savings.tolist(),
                "pairs": [{"epsilon": e, "lambda": lam} for e, lam in sorted(self.lambdas.items())],
            },
            indent=2,
        )


def _member_parameters(policy: ExitPolicy, member: int) -> list[Tensor]:
    """Views of member ``member``'s weights and biases in ``policy``, layer by layer."""
    if isinstance(member, bool) or not isinstance(member, int) or not 0 <= member < policy.members:
        raise IndexError(f"member must be an int in 0..{policy.members - 1}, got {member!r}")
    first, middle, last = policy.mlp[0], policy.mlp[2], policy.mlp[4]
    rows = slice(member * policy.hidden, (member + 1) * policy.hidden)
    return [first.weight[rows], first.bias[rows], middle.weight[member], middle.bias[member],
            last.weight[member], last.bias[member]]  # fmt: skip


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def fit_policy(
    policy: ExitPolicy,
    outputs: ExitOutputs,
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train ``policy`` with BCE against each exit's observed target on ``outputs``: agreement of its
    prediction with N_K's (labels unused; N_K's own p_K = 1 is not learned), or its correctness.

    Each member of an ensemble is trained alone, from its own initialisation, with the data order of
    ``seed`` + its index. Every sample is seen once per stage s where the policy may run
    (:meth:`ExitPolicy.planning_stages` of all exits, so that restricting the exits later needs no
    retraining), with the statistics of exits 1..s, and learns p_k for k ≥ s (what the plan at s
    reads). Standardises the features with their mean / std on ``outputs`` first. Returns the mean
    loss (over the members) of every epoch.
    """
    from tqdm.auto import tqdm

    policy.check_outputs(outputs)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if policy.members > 1:
        # Each member alone, from its own initialisation and its own shuffle (seed + m): on make demo's
        # networks the certified saving spread less over policy seeds than with one shared order.
        curves = []
        for member in range(policy.members):
            single = policy.member(member)
            curves.append(fit_policy(single, outputs, epochs, batch_size, lr, seed + member, progress))
            policy.set_member(member, single)
        policy.eval()
        return [sum(losses) / len(losses) for losses in zip(*curves, strict=True)]
    device = policy.feature_mean.device
    features = outputs.features.to(device, policy.feature_mean.dtype)
    statistics = outputs.statistics.to(device, policy.feature_mean.dtype)
    if policy.target == "agreement":
        if outputs.predictions is None:
            raise ValueError("an agreement policy learns from the exits' predictions, and these outputs have none "
                             "(collected by an older version: collect them again)")
        observed = outputs.predictions == outputs.predictions[:, -1:]
    else:
        observed = outputs.correct
    targets = observed.to(device, policy.feature_mean.dtype)
    with torch.no_grad():
        policy.feature_mean.copy_(features.mean(0))
        policy.feature_scale.copy_(features.std(0, unbiased=False).clamp_min(1e-6))
    stages = range(1, policy.num_exits + 1) if policy.mode == "sequential" else [1]
    if policy.target == "agreement":
        stages = [stage for stage in stages if stage < policy.num_exits]  # at N_K nothing is left to learn
    # One row per (stage, sample): the stage and the sample index.
    rows = torch.cartesian_prod(torch.tensor(list(stages)), torch.arange(outputs.num_samples)).reshape(-1, 2)
    exit_numbers = torch.arange(1, policy.num_exits + 1, device=device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(policy.mlp.parameters(), lr=lr, weight_decay=1e-4)
    policy.train()
    losses = []
    for _ in tqdm(range(epochs), desc="policy", disable=not progress, leave=False):
        order = rows[torch.randperm(rows.shape[0], generator=generator)]
        total = 0.0
        for chunk in order.split(batch_size):
            stage_of, sample = chunk[:, 0].to(device), chunk[:, 1].to(device)
            # The input a row gets at its stage in forward: the statistics of exits beyond the stage
            # zero and flagged unknown (flagging every exit known here, as before, trained the MLP on
            # inputs it never sees when it decides).
            # One member here (an ensemble's members are fitted one by one above).
            logits = policy.member_logits(features[sample], statistics[sample], stage_of)[:, 0]
            weights = (exit_numbers[None, :] >= stage_of[:, None]).to(logits.dtype)
            if policy.target == "agreement":
                weights[:, -1] = 0.0  # N_K agrees with itself: p_K = 1 is fixed, not learned
            loss = (F.binary_cross_entropy_with_logits(logits, targets[sample], reduction="none") * weights).sum() \
                / weights.sum().clamp_min(1.0)  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * chunk.shape[0]
        losses.append(total / max(rows.shape[0], 1))
    policy.eval()
    return losses


def calibrate_lambda(policy: ExitPolicy, outputs: ExitOutputs, epsilons: Iterable[float]) -> dict[float, float | None]:
    """For every ε, the smallest λ* ≥ 0 whose accuracy on the calibration ``outputs`` is ≥ 1 − ε.

    One bisection per ε over t = λ / (1 + λ) ∈ [0, 1]. An ε no λ reaches warns and stores ``None``
    (always N_K). The pairs are stored in ``policy.lambdas`` and returned.
    """
    policy.check_outputs(outputs)
    epsilons = [check_epsilon(epsilon) for epsilon in epsilons]
    device = policy.feature_mean.device
    with torch.no_grad():
        probabilities = policy.stage_probabilities(outputs.features.to(device), outputs.statistics.to(device)).cpu()
    savings, allowed, stages = policy.savings.cpu(), policy.allowed.cpu(), policy.planning_stages().cpu()

    def decide(t: float) -> Tensor:
        return planned_exits(probabilities, savings, math.inf if t == 1.0 else t / (1.0 - t), allowed, stages)

    for epsilon in epsilons:
        t = _smallest_passing(decide, outputs.correct, 1.0 - epsilon)
        if t is None:
            _unreachable(epsilon, "lambda", outputs.correct)
            policy.lambdas[epsilon] = None
        else:
            policy.lambdas[epsilon] = math.inf if t == 1.0 else t / (1.0 - t)
    return {epsilon: policy.lambdas[epsilon] for epsilon in epsilons}


# ----------------------------------------------------------------------------------------------
# Evaluation of a rule on collected outputs
# ----------------------------------------------------------------------------------------------


@dataclass
class OperatingPoint:
    """Accuracy and cost of one exit assignment on one split.

    Attributes:
        name: what produced it ("N_3", "policy", "confidence", ...).
        epsilon: the target it was calibrated for (None for static sub-networks).
        parameter: λ* or τ (None: static / fall-back).
        accuracy, top5: fractions in [0, 1].
        macs: average MACs per sample (exit MACs + the rule's own MACs).
        saving: 1 − macs / macs(N_K).
        exit_fractions: fraction of samples leaving at each exit (K values).
    """

    name: str
    epsilon: float | None
    parameter: float | None
    accuracy: float
    top5: float
    macs: float
    saving: float
    exit_fractions: list[float]


def evaluate_exits(
    exits: Tensor,
    outputs: ExitOutputs,
    macs: Tensor,
    name: str,
    epsilon: float | None = None,
    parameter: float | None = None,
    extra_macs: float | Tensor = 0.0,
) -> OperatingPoint:
    """Accuracy / top-5 / average MACs of sending sample i to exit ``exits[i]`` (1-based (N,)).

    ``extra_macs``: cost of the rule itself (the policy MLP): one value for every sample or (N,)
    per sample (:meth:`ExitPolicy.decision_macs`).
    """
    if exits.shape != (outputs.num_samples,):
        raise ValueError(f"exits must be (N={outputs.num_samples},), got {tuple(exits.shape)}")
    exits = exits.cpu()
    rows = torch.arange(outputs.num_samples)
    index = exits - 1
    counts = torch.bincount(index, minlength=outputs.num_exits).double()
    average = (macs.double()[index] + torch.as_tensor(extra_macs, dtype=torch.float64)).mean().item()
    return OperatingPoint(
        name=name,
        epsilon=epsilon,
        parameter=parameter,
        accuracy=outputs.correct[rows, index].double().mean().item(),
        top5=outputs.correct_top5[rows, index].double().mean().item(),
        macs=average,
        saving=1.0 - average / macs[-1].item(),
        exit_fractions=(counts / outputs.num_samples).tolist(),
    )
