"""Plumbing of benchmarks/bench_call_overhead.py: every case runs, is timed and reaches the report."""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_call_overhead
from tests.kernels.availability import require_backend


def test_the_kernel_alone_computes_what_the_public_call_does():
    """"kernel alone" must be the same computation as "ours" (else "entry" would compare unlike calls);
    the stock call is the dense layer of the same size, so only its shape is the same."""
    require_backend("cpp")
    with torch.no_grad():
        for name, functions in bench_call_overhead.cases().items():
            ours = functions["ours"]()
            stock = functions["stock PyTorch"]()
            assert ours.shape[0] == stock.shape[0], name
            if "kernel alone" not in functions:
                continue
            if name.endswith("into out="):  # both write the stage into one buffer: NaN it before each
                ours.fill_(float("nan"))
                kernel = functions["kernel alone"]().clone()
                ours.fill_(float("nan"))
                functions["ours"]()
                assert torch.isfinite(ours).any() and torch.isnan(ours).any(), name  # the stage alone
            else:
                kernel = functions["kernel alone"]()
            torch.testing.assert_close(ours.reshape(kernel.shape), kernel, equal_nan=True, msg=name)


def test_report_lists_every_case(tmp_path, monkeypatch):
    require_backend("cpp")
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep the session's thread count
    path = bench_call_overhead.main(["--timing", "tiny", "--out", str(tmp_path), "--name", "overhead"])
    text = path.read_text()
    for case in bench_call_overhead.cases():
        assert f"| {case} |" in text
    assert "entry µs" in text and "torch_threads" in text


@pytest.mark.parametrize("argv", [["--timing", "slow"], ["--threads", "two"]])
def test_bad_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        bench_call_overhead.main(argv)
    assert "error" in capsys.readouterr().err
