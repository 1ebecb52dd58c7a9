"""The surgery report: rows for every variant, N_K exact for expand + latest, markdown tables."""

from __future__ import annotations

from rdn.surgery.report import VARIANTS, surgery_report, surgery_rows


def test_report_rows_and_markdown():
    rows = surgery_rows(["resnext_small"], input_size=32, batch=2)
    assert len(rows) == 2 * len(VARIANTS)
    by_variant = {(row.mode, row.copies, row.exact, row.select): row for row in rows}
    exact = by_variant["expand", "latest", True, "greedy"]
    assert len(exact.macs) == 7 and exact.macs == sorted(exact.macs)
    assert exact.last_error < 1e-4 < by_variant["truncate", "latest", True, "greedy"].last_error
    assert len(by_variant["truncate", "latest", True, "random"].macs) == 4
    text = surgery_report(rows, input_size=32, k=4)
    cost_rows = [line for line in text.splitlines() if line.startswith("| resnext_small |") and line.endswith("× |")]
    assert len(cost_rows) == 1 and cost_rows[0].count(" / ") == 2 * 6  # 7 MACs and 7 params per row
    assert 0 < exact.coverage < 1 and f"| {100 * exact.coverage:.0f} % |" in cost_rows[0]  # the stem is skipped
    assert text.count("\n| resnext_small | expand |") == 6 and "Paper Table 1" in text
