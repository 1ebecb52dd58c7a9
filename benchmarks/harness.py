"""The timing harness every benchmark uses, and the description of the machine it ran on.

CPU: each callable is warmed up, then timed in *interleaved rounds*: every round takes one sample
of every implementation (in a rotated order), a sample being a loop long enough to dwarf the
timer's resolution. Interleaving matters on a shared machine: load that comes and goes hits
every implementation alike, so the ratios stay meaningful even when the absolute times drift.
The median and quartiles of the samples are reported. The interleaved rounds and the machine
description come from :mod:`rdn_kernels.timing`; this module adds the warm-up by time, the
quartiles and what only a benchmark records (triton version, git commit, date).

GPU: ``triton.testing.do_bench`` (warm-up, L2 flush before every run, CUDA-event timing),
median and quartiles.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from rdn_kernels.backends import cudnn_conv_allows_tf32
from rdn_kernels.timing import device_name, interleaved_samples, machine_summary


@dataclass(frozen=True)
class TimingConfig:
    """How long to warm up and how many samples to take.

    CPU: ``warmup_s`` of calls per implementation (at least one), then ``rounds`` samples, each
    looping the call until ``min_sample_s`` has passed. GPU: ``do_bench(warmup=gpu_warmup_ms,
    rep=gpu_rep_ms)``.
    """

    warmup_s: float = 0.1
    rounds: int = 11
    min_sample_s: float = 0.02
    gpu_warmup_ms: int = 25
    gpu_rep_ms: int = 100
    # CPU: "wall" (perf_counter) or "thread" (the calling thread's CPU time, time.thread_time: a
    # single-threaded run on a shared machine then does not count the time it sat descheduled;
    # it still pays for the cache and memory bandwidth its neighbours take). "thread" needs one
    # torch thread: with more, the work of the other threads is not counted.
    clock: str = "wall"

    def __post_init__(self):
        if self.clock not in ("wall", "thread"):
            raise ValueError(f"clock must be 'wall' or 'thread', got {self.clock!r}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if min(self.warmup_s, self.min_sample_s) < 0 or min(self.gpu_warmup_ms, self.gpu_rep_ms) < 1:
            raise ValueError(f"warm-up and sample lengths must be non-negative (GPU ones >= 1 ms), got {self}")


TIMING_PRESETS = {
    "full": TimingConfig(),
    "quick": TimingConfig(warmup_s=0.05, rounds=7, min_sample_s=0.01, gpu_warmup_ms=10, gpu_rep_ms=40),
    # The plumbing tests: one warm-up call, two one-call samples.
    "tiny": TimingConfig(warmup_s=0.0, rounds=2, min_sample_s=0.0, gpu_warmup_ms=1, gpu_rep_ms=1),
}


@dataclass(frozen=True)
class Timing:
    median_ms: float
    q25_ms: float
    q75_ms: float


def measure(fns: Mapping[str, Callable[[], object]], device: torch.device, config: TimingConfig) -> dict[str, Timing]:
    """Time every callable of ``fns`` on ``device``; the callables must not need arguments."""
    if not fns:
        return {}
    if device.type == "cuda":
        return {name: _time_gpu(fn, config) for name, fn in fns.items()}
    if device.type != "cpu":
        raise ValueError(f"device must be cpu or cuda, got {device}")
    return _time_cpu_interleaved(fns, config)


def _clock(config: TimingConfig) -> Callable[[], float]:
    return time.thread_time if config.clock == "thread" else time.perf_counter


def _warm_up_and_count(fn: Callable[[], object], config: TimingConfig) -> int:
    """Run ``fn`` for ``warmup_s`` (at least once); return how many calls make one sample."""
    clock = _clock(config)
    calls, start = 0, clock()
    while True:
        fn()
        calls += 1
        elapsed = clock() - start
        if elapsed >= config.warmup_s:
            break
    per_call = elapsed / calls
    return max(1, math.ceil(config.min_sample_s / per_call)) if per_call > 0 else 1


def _time_cpu_interleaved(fns: Mapping[str, Callable[[], object]], config: TimingConfig) -> dict[str, Timing]:
    # The warm-up here is by time (it also sizes the samples), so the rounds need no more of it.
    calls_per_sample = {name: _warm_up_and_count(fn, config) for name, fn in fns.items()}
    if config.clock == "thread":
        samples = _thread_time_samples(fns, config.rounds, calls_per_sample)
    else:
        samples = interleaved_samples(fns, config.rounds, warmup=0, calls=calls_per_sample)
    return {name: _summary([seconds * 1e3 for seconds in values]) for name, values in samples.items()}


def _thread_time_samples(fns: Mapping[str, Callable[[], object]], rounds: int,
                         calls: Mapping[str, int]) -> dict[str, list[float]]:
    """:func:`rdn_kernels.timing.interleaved_samples` (same rotated rounds) on the thread's CPU time."""
    if torch.get_num_threads() != 1:
        raise ValueError(f"clock='thread' times the calling thread only: run with one torch thread, "
                         f"not {torch.get_num_threads()}")
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.thread_time()
            for _ in range(calls[name]):
                fns[name]()
            samples[name].append((time.thread_time() - start) / calls[name])
    return samples


def _summary(values_ms: list[float]) -> Timing:
    if len(values_ms) == 1:
        return Timing(values_ms[0], values_ms[0], values_ms[0])
    q25, median, q75 = statistics.quantiles(values_ms, n=4, method="inclusive")
    return Timing(median, q25, q75)


def _time_gpu(fn: Callable[[], object], config: TimingConfig) -> Timing:
    from triton.testing import do_bench  # only on the GPU path: CPU runs need no triton

    q25, median, q75 = do_bench(fn, warmup=config.gpu_warmup_ms, rep=config.gpu_rep_ms, quantiles=[0.25, 0.5, 0.75])
    return Timing(median, q25, q75)


# ----------------------------------------------------------------------------------------------
# Correctness check of a benchmarked implementation
# ----------------------------------------------------------------------------------------------

# Largest allowed max|actual - expected| / max|expected| against a float64 evaluation. Loose on
# purpose: it catches a wrong kernel (a missing block or stage is an O(1) error), not rounding
# (fp32 convolutions may run in TF32 on a GPU).
CHECK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def relative_error(actual: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> float:
    """The worst, over the tensors, of max |actual - expected| / max |expected|."""
    if len(actual) != len(expected):
        raise ValueError(f"got {len(actual)} tensors to compare with {len(expected)}")
    worst = 0.0
    for got, want in zip(actual, expected, strict=True):
        if got.shape != want.shape:
            return math.inf
        want = want.to(torch.float64)
        scale = want.abs().max().item() if want.numel() else 0.0
        error = (got.to(torch.float64) - want).abs().max().item() if want.numel() else 0.0
        worst = max(worst, error / scale if scale > 0 else error)
    return worst


# ----------------------------------------------------------------------------------------------
# The machine
# ----------------------------------------------------------------------------------------------


def device_tag(device: torch.device) -> str:
    """File-name tag: ``cpu`` or the GPU name in lower case (``nvidia-h100-80gb-hbm3``)."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    """Short commit of the checkout, with ``+dirty`` when tracked files differ (kernels being tuned)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def machine_info(device: torch.device) -> dict[str, str]:
    """Everything a result needs beside it to be read later: device, CPU, versions, date."""
    info = machine_summary(device) | {
        "triton": _package_version("triton"),
        "git_commit": _git_commit(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if device.type == "cpu":
        # glibc's allocator tuning changes what a fresh large output costs (first-touch page faults
        # of memory mapped anew on every call, or reuse of freed heap): say which one was timed.
        tuning = [f"{name}={os.environ[name]}" for name in sorted(os.environ) if name.startswith("MALLOC_")]
        info["allocator"] = ", ".join(tuning) if tuning else "glibc defaults"
    if device.type == "cuda":
        info["cuda"] = str(torch.version.cuda)
        info["tf32"] = f"conv {cudnn_conv_allows_tf32()}, matmul {torch.backends.cuda.matmul.allow_tf32}"
        info["cudnn_benchmark"] = str(torch.backends.cudnn.benchmark)
    return info
