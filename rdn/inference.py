"""Dynamic inference: real per-sample early exit through an RDN's stages (DESIGN.md §8).

:func:`dynamic_forward` runs a batch through N_1 (``net.start``) and then, stage by stage, lets the
policy plan every running sample's exit from N_1's pooled features and the softmax statistics of the
exits computed so far (at N_1 only in its one-shot mode), drops the samples whose plan is the current
stage (``StagedState.index_select``) and advances the rest to the next exit one of them plans,
computing only the new channel groups of every layer from the cached prefixes (``net.step``: the kernels'
``stages=`` / ``out=`` path). Each sample's logits are those of N_{exit(x)}.

:func:`evaluate_dynamic` measures accuracy and average MACs over a split with it, and
:func:`measure_throughputs` / :func:`measure_peak_memory` time it (median of interleaved repeats) and measure
its peak memory against any static callable (N_K, N_s, the base model).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rdn.policy import ExitPolicy, OperatingPoint, capture_first_features, exit_macs, softmax_statistics

__all__ = [
    "STRATEGIES",
    "DynamicOutput",
    "Measurement",
    "dynamic_forward",
    "evaluate_dynamic",
    "benchmark",
    "measure",
    "measure_peak_memory",
    "measure_throughput",
    "measure_throughputs",
]


@dataclass
class DynamicOutput:
    """Result of :func:`dynamic_forward` on a batch of N samples.

    Attributes:
        logits: (N, num_classes), row i from sub-network N_{exits[i]}.
        exits: (N,) int64, 1-based exit of every sample.
        static: the batch ran static N_K in one pass, without the policy (λ = ``None``).
    """

    logits: Tensor
    exits: Tensor
    static: bool = False


STRATEGIES = ("staged", "jump", "recompute")


@torch.no_grad()
def dynamic_forward(net: nn.Module, policy: ExitPolicy, x: Tensor, lam: float | None,
                    strategy: str = "staged") -> DynamicOutput:  # fmt: skip
    """Early-exit inference of one batch ``x`` (N, C, H, W) under the rule of ``policy`` at λ = ``lam``.

    ``net`` (a RussianDollNet) and ``policy`` should be in eval mode. At every planning stage of the
    policy (:meth:`~rdn.policy.ExitPolicy.planning_stages`) each running sample plans its exit from
    N_1's features and the softmax statistics of the exits computed so far; samples whose plan is
    the current stage N_s leave the batch; the others go straight to the next exit any of them
    plans (or where the policy plans again), computing the groups in between in one staged call
    per layer. The loop stops as soon as no sample goes on.

    ``strategy="jump"`` takes the same exits with fewer, larger steps: after N_1 the samples that go
    on are stepped to N_K at once, every exit's logits come from its head on the cached features, and
    the policy's later decisions are replayed on them (:meth:`~rdn.policy.ExitPolicy.exits`). Each
    stop of the staged walk has a fixed cost (a call per layer, the cache of the samples that go on
    copied and grown); where that outweighs the later groups the samples leaving between N_2 and
    N_K skip, the jump is faster (``benchmarks/bench_deploy.py`` times the three). Its samples past N_1
    compute N_K, so their MACs are not the ones their exits count.

    ``strategy="recompute"`` takes the same decisions as the jump, but the samples that go on after
    N_1 run one static pass of the whole network (every exit's logits at once) instead of a step
    from N_1's cache: N_1's groups are computed twice for them, in fewer, larger calls on
    contiguous tensors, without the step's copies of channel slices. Its logits equal the staged
    walk's up to floating-point rounding (about 1e-6 here), so an exit decided by a tie could differ.

    ``lam=None`` (always N_K, e.g. a calibration that certified no early exit) runs static N_K in
    one pass instead: the staged path would reach the same logits slower and holding every stage's
    buffers, and the policy has nothing to decide.
    """
    policy.check_network(net)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if lam is None:
        exits = torch.full((x.shape[0],), net.num_subnets, dtype=torch.long, device=x.device)
        return DynamicOutput(net(x, subnet=net.num_subnets), exits, static=True)
    with capture_first_features(net) as captured:
        state = net.start(x)
    features = captured[-1]
    if strategy != "staged":
        return _jump(net, policy, lam, state, features, x if strategy == "recompute" else None)
    planning = policy.planning_stages().tolist()
    logits = torch.empty_like(state.logits)
    exits = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    rows = torch.arange(x.shape[0], device=x.device)  # original index of every row still in the batch
    statistics = softmax_statistics(state.logits)[:, None]  # (rows, s, 3) of the exits computed so far
    while True:
        current = state.subnet
        if planning[current - 1]:
            plan = policy.plan(features, statistics, lam).to(x.device)
        leaving = plan == current
        logits[rows[leaving]] = state.logits[leaving]
        exits[rows[leaving]] = current
        going_on = ~leaving
        if not bool(going_on.any()):
            break
        if not bool(going_on.all()):
            keep = going_on.nonzero().squeeze(1)
            state, rows, plan = state.index_select(keep), rows[keep], plan[keep]
            features, statistics = features[keep], statistics[keep]
        # Jump straight to where the next sample leaves or the policy plans again: one staged call
        # per layer for all the groups in between; the skipped exits' heads run for their statistics.
        planned_next = next((s for s in range(current + 1, len(planning) + 1) if planning[s - 1]), len(planning))
        target = _next_stop(net, current, min(int(plan.min()), planned_next))
        state = net.step(state, target)
        passed = [net.exit_logits(state, s) for s in range(current + 1, target)] + [state.logits]
        statistics = torch.cat([statistics, softmax_statistics(torch.stack(passed, dim=1))], dim=1)
    return DynamicOutput(logits, exits)


def _jump(net: nn.Module, policy: ExitPolicy, lam: float, state, features: Tensor,
          images: Tensor | None) -> DynamicOutput:  # fmt: skip
    """The rest of :func:`dynamic_forward` after N_1 for ``strategy="jump"`` (``images`` None: the samples
    that go on are stepped from N_1's cache to N_K) or ``"recompute"`` (``images``, the batch: they run
    one static pass of the whole network)."""
    first = softmax_statistics(state.logits)[:, None]
    leaving = policy.plan(features, first, lam).to(state.logits.device) == 1
    logits, exits = state.logits.clone(), torch.ones(features.shape[0], dtype=torch.long, device=leaving.device)
    going_on = (~leaving).nonzero().squeeze(1)
    if going_on.numel() == 0:
        return DynamicOutput(logits, exits)
    some_leave = going_on.numel() < leaving.numel()
    if some_leave:
        features = features[going_on]
    K = net.num_subnets
    if images is not None:
        every = torch.stack(net(images[going_on] if some_leave else images), dim=1)  # (N', K, C), exits order
    else:
        if some_leave:
            state = state.index_select(going_on)
        while state.subnet < K:
            state = net.step(state, _next_stop(net, state.subnet, K))
        every = torch.stack([net.exit_logits(state, s) for s in range(1, K)] + [state.logits], dim=1)
    chosen = policy.exits(features, softmax_statistics(every), lam).to(every.device)
    logits[going_on] = every[torch.arange(every.shape[0], device=every.device), chosen - 1]
    exits[going_on] = chosen
    return DynamicOutput(logits, exits)


def _next_stop(net: nn.Module, current: int, target: int) -> int:
    """``target``, or the first exit between ``current`` and it that a jump to ``target`` would not
    compute (a deep exit before a shallow target, with a depth split), so that the statistics of
    every exit passed are known."""
    depth = net.exits[target - 1][1]
    return next((s for s in range(current + 1, target) if net.exits[s - 1][1] > depth), target)


@torch.no_grad()
def evaluate_dynamic(
    net: nn.Module,
    policy: ExitPolicy,
    lam: float | None,
    data: Iterable,
    device: torch.device | str | None = None,
    epsilon: float | None = None,
    progress: bool = True,
) -> OperatingPoint:
    """Accuracy, top-5 and average MACs of :func:`dynamic_forward` over ``data`` ((x, y) batches).

    The MACs of a sample are ``net.macs(exit)`` of its exit plus the policy's own MACs
    (:meth:`~rdn.policy.ExitPolicy.rule_macs`: one evaluation per planning stage it went through,
    none on the static path of ``lam=None``).
    """
    from tqdm.auto import tqdm

    macs = exit_macs(net)
    correct = top5 = total = 0
    total_macs = 0.0
    counts = torch.zeros(net.num_subnets, dtype=torch.float64)
    for x, y in tqdm(data, desc=f"dynamic λ={lam}", disable=not progress, leave=False):
        if device is not None:
            x, y = x.to(device), y.to(device)
        output = dynamic_forward(net, policy, x, lam)
        top = output.logits.topk(min(5, output.logits.shape[1]), dim=1).indices
        correct += int((top[:, 0] == y).sum())
        top5 += int((top == y[:, None]).any(1).sum())
        exits = output.exits.cpu()
        total_macs += (macs[exits - 1] + policy.rule_macs(exits, lam)).sum().item()
        counts += torch.bincount(exits - 1, minlength=net.num_subnets).double()
        total += y.shape[0]
    if total == 0:
        raise ValueError("data yielded no samples")
    average = total_macs / total
    return OperatingPoint(
        name="dynamic",
        epsilon=epsilon,
        parameter=lam,
        accuracy=correct / total,
        top5=top5 / total,
        macs=average,
        saving=1.0 - average / macs[-1].item(),
        exit_fractions=(counts / total).tolist(),
    )


# ----------------------------------------------------------------------------------------------
# Wall clock and memory
# ----------------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_throughputs(
    fns: dict[str, Callable[[Tensor], object]], x: Tensor, repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Images per second of every ``fns[name](x)``: batch size / median wall-clock seconds.

    The runs are interleaved (each of the ``repeats`` rounds times every callable once, in turn),
    so a shared machine's slow drifts in load hit all of them alike instead of whichever ran then.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for fn in fns.values():
        for _ in range(warmup):
            fn(x)
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _synchronize(x.device)
            begin = time.perf_counter()
            fn(x)
            _synchronize(x.device)
            seconds[name].append(time.perf_counter() - begin)
    return {name: x.shape[0] / statistics.median(times) for name, times in seconds.items()}


def measure_throughput(fn: Callable[[Tensor], object], x: Tensor, repeats: int = 5, warmup: int = 1) -> float:
    """Images per second of ``fn(x)``: batch size / median wall-clock seconds over ``repeats`` runs."""
    return measure_throughputs({"fn": fn}, x, repeats, warmup)["fn"]


@torch.no_grad()
def measure_peak_memory(fn: Callable[[Tensor], object], x: Tensor) -> int:
    """Peak bytes allocated by ``fn(x)`` above what was allocated before it (``x`` excluded).

    GPU: ``torch.cuda.max_memory_allocated``. CPU: the allocation / free events of the torch
    profiler (``profile_memory=True``) replayed in time order; temporaries allocated and freed
    inside one op count at their net size, so this is a lower bound on the true peak.
    """
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        before = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        fn(x)
        torch.cuda.synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(x)
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


@dataclass
class Measurement:
    """Wall clock and memory of one way of running a batch."""

    name: str
    batch_size: int
    images_per_second: float
    peak_bytes: int


def measure(name: str, fn: Callable[[Tensor], object], x: Tensor, repeats: int = 5) -> Measurement:
    """Throughput (median of ``repeats``) and peak memory of ``fn`` on the batch ``x``."""
    return Measurement(name, x.shape[0], measure_throughput(fn, x, repeats), measure_peak_memory(fn, x))


def benchmark(
    net: nn.Module,
    policy: ExitPolicy,
    lam: float | None,
    x: Tensor,
    repeats: int = 5,
    subnets: Iterable[int] | None = None,
    base: nn.Module | None = None,
    progress: bool = True,
    strategies: Iterable[str] = ("staged",),
) -> list[Measurement]:
    """Throughput and peak memory on the batch ``x``: the base model (when given), N_s run statically
    for every s in ``subnets`` (default 1..K), and dynamic inference at λ = ``lam`` with every engine
    strategy of ``strategies`` (named ``dynamic`` for the staged walk, ``dynamic (jump)`` for the jump)."""
    runs: list[tuple[str, Callable[[Tensor], object]]] = [] if base is None else [("base", base)]
    for s in range(1, net.num_subnets + 1) if subnets is None else subnets:
        runs.append((f"N_{s} static", lambda batch, s=s: net(batch, subnet=s)))
    for strategy in strategies:
        name = "dynamic" if strategy == "staged" else f"dynamic ({strategy})"
        runs.append((name, lambda batch, strategy=strategy: dynamic_forward(net, policy, batch, lam, strategy)))
    if progress:
        names = ", ".join(name for name, _ in runs)
        print(f"  timing {names} (batch {x.shape[0]}, {repeats} interleaved rounds, {x.device})", flush=True)
    speeds = measure_throughputs(dict(runs), x, repeats)
    with torch.no_grad():
        return [Measurement(name, x.shape[0], speeds[name], measure_peak_memory(fn, x)) for name, fn in runs]
