"""rdn_kernels.timing: the median timer, the interleaved rounds and the machine summary."""

from __future__ import annotations

import time

import pytest
import torch

from rdn_kernels import timing


def test_time_median_measures_the_call_not_the_warmup():
    calls = []

    def sleepy() -> None:
        calls.append(None)
        time.sleep(0.003)

    seconds = timing.time_median(sleepy, repeats=3, warmup=2)
    assert len(calls) == 5
    assert 0.003 <= seconds < 0.2


def test_interleaved_rounds_rotate_the_order_and_count_calls():
    order: list[str] = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    samples = timing.interleaved_samples(fns, rounds=3, warmup=0, calls={"a": 2, "b": 1, "c": 1})
    assert order == ["a", "a", "b", "c", "b", "c", "a", "a", "c", "a", "a", "b"]
    assert {name: len(values) for name, values in samples.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(value >= 0 for values in samples.values() for value in values)


def test_medians_rank_a_slow_callable_above_a_fast_one():
    medians = timing.time_medians({"slow": lambda: time.sleep(0.004), "fast": lambda: None}, repeats=3)
    assert medians["fast"] < 0.004 <= medians["slow"]


@pytest.mark.parametrize("kwargs", [{"rounds": 0}, {"rounds": 1, "warmup": -1}, {"rounds": 1, "calls": 0}])
def test_bad_counts_are_rejected(kwargs):
    with pytest.raises(ValueError):
        timing.interleaved_samples({"f": lambda: None}, **kwargs)


def test_machine_summary_describes_this_machine():
    summary = timing.machine_summary()
    assert summary["device"] == "cpu" and summary["torch"] == torch.__version__
    assert summary["cpu"] == timing.cpu_name() and summary["cpu"]
    assert int(summary["torch_threads"]) == torch.get_num_threads()
    assert all(isinstance(value, str) for value in summary.values())


def test_cpu_name_falls_back_when_cpuinfo_is_unreadable(monkeypatch):
    def unreadable(self, *args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(timing.Path, "read_text", unreadable)
    monkeypatch.setattr(timing.platform, "processor", lambda: "")
    assert timing.cpu_name() == "unknown"
