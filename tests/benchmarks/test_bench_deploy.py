"""Plumbing of benchmarks/bench_deploy.py on a tiny network (timings themselves are not checked)."""

from __future__ import annotations

import torch

from benchmarks.bench_deploy import FORMS, compare, markdown, stage_costs, stage_markdown
from rdn.inference import STRATEGIES
from rdn.policy import ExitPolicy
from tests.train.helpers import tiny_rdn


def test_every_form_is_checked_and_timed():
    net = tiny_rdn(copy_fraction=1.0).eval()
    policy = ExitPolicy.for_network(net, hidden=4).eval()
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    rows = compare(net, policy, 0.5, x, repeats=1)
    assert [row["form"] for row in rows] == list(FORMS)
    assert rows[0]["nk_vs_trained_nchw"] == 1
    assert all(row[key] > 0 for row in rows for key in ("n1", "nk"))
    assert all(set(row["walks"]) == set(STRATEGIES) and min(row["walks"].values()) > 0 for row in rows)
    text = markdown(rows, net.num_subnets, 6, "note")
    assert text.startswith("K = 3, batch 6. note") and "| BN folded, channels_last |" in text
    assert all(f"engine ({strategy}) images/s" in text for strategy in STRATEGIES)


def test_stage_costs_table():
    net = tiny_rdn(copy_fraction=1.0).eval()
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    rows = stage_costs(net, x, sizes=(6, 2), repeats=1)
    assert [(row["size"], row["path"]) for row in rows][:4] == [
        (6, "start (N_1)"), (6, "start + one step to N_3"), (6, "start + a step to every exit"), (6, "static N_3")]
    assert all(row["ms"] > 0 for row in rows)
    assert stage_markdown(rows).splitlines()[2].startswith("| 6 | ")
