"""Wall-clock timing and a description of the machine, for anything that reports a speed.

Generic on purpose: it knows callables and devices, not models or kernels. The benchmarks'
harness builds its warm-up-by-time and quartile reporting on :func:`interleaved_samples`; code
that only needs "how long does this take" uses :func:`time_median`.

Timings are *interleaved*: every round takes one sample of every callable, in a rotated order,
so load that comes and goes on a shared machine hits all of them alike and their ratios stay
meaningful even when the absolute times drift.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

__all__ = [
    "cpu_name",
    "device_name",
    "interleaved_samples",
    "machine_summary",
    "synchronize",
    "time_median",
    "time_medians",
]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def device_name(device: torch.device | str | None = None) -> str:
    """``"cpu"`` for a CPU (or None), the GPU's marketing name for a CUDA device."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def machine_summary(device: torch.device | str | None = None) -> dict[str, str]:
    """What a timing needs beside it to be read later: device, CPU, cores, torch threads, torch.

    Values are strings so that the summary can go into a CSV row or a JSON file as is.
    """
    return {
        "device": device_name(device),
        "cpu": cpu_name(),
        "cpu_cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
    }


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (a no-op for the CPU or None): CUDA calls return early."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_samples(
    fns: Mapping[str, Callable[[], object]],
    rounds: int,
    *,
    warmup: int = 1,
    calls: int | Mapping[str, int] = 1,
    synchronize_device: torch.device | str | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every callable: ``rounds`` samples each, the rounds interleaved.

    Each callable is first called ``warmup`` times. A sample runs it ``calls`` times in a row
    (an int for all, or per name: enough calls make a sample long against the timer's
    resolution) and records the mean. With ``synchronize_device`` a CUDA device is synchronised
    before and after each sample, so the sample covers the work and not only its launch.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds}, {warmup}")
    names = list(fns)
    per_name = {name: calls if isinstance(calls, int) else calls[name] for name in names}
    if any(count < 1 for count in per_name.values()):
        raise ValueError(f"calls must be >= 1, got {per_name}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        # Rotating the order keeps any one callable from always running right after another
        # (caches, frequency boost) or always first in a round.
        shift = round_index % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            fn, count = fns[name], per_name[name]
            synchronize(synchronize_device)
            start = time.perf_counter()
            for _ in range(count):
                fn()
            synchronize(synchronize_device)
            samples[name].append((time.perf_counter() - start) / count)
    return samples


def time_medians(
    fns: Mapping[str, Callable[[], object]],
    repeats: int = 5,
    warmup: int = 1,
    synchronize_device: torch.device | str | None = None,
) -> dict[str, float]:
    """Median seconds per call of every callable over ``repeats`` interleaved rounds."""
    samples = interleaved_samples(fns, repeats, warmup=warmup, synchronize_device=synchronize_device)
    return {name: statistics.median(values) for name, values in samples.items()}


def time_median(
    fn: Callable[[], object],
    repeats: int = 5,
    warmup: int = 1,
    synchronize_device: torch.device | str | None = None,
) -> float:
    """Median seconds of one call of ``fn`` over ``repeats`` runs, after ``warmup`` calls."""
    return time_medians({"fn": fn}, repeats, warmup, synchronize_device)["fn"]
