"""Benchmark reports: a CSV (one row per case × implementation), a markdown table and a PNG plot.

The rows are the dicts :func:`benchmarks.bench_nested_conv.run_case` returns; the machine
description (:func:`benchmarks.harness.machine_info`) goes into every CSV row, the markdown
header and the plot title.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

# Machine columns first, then the case, then the implementation's measurement.
INFO_COLUMNS = ("date", "device", "cpu", "torch", "triton", "git_commit")
CASE_COLUMNS = ("shape", "sources", "kind", "batch", "in_channels", "out_channels", "height", "width", "kernel",
                "stride", "padding", "K", "in_splits", "out_splits", "dtype", "mode", "stage", "useful_gflop",
                "dense_gflop", "useful_fraction", "min_mbytes", "flop_ideal_ms", "roofline_ms", "roofline_bound")
RESULT_COLUMNS = ("implementation", "role", "status", "max_rel_error", "median_ms", "q25_ms", "q75_ms",
                  "ratio_to_flop_ideal", "ratio_to_roofline", "speedup_vs_dense")
CSV_COLUMNS = INFO_COLUMNS + CASE_COLUMNS + RESULT_COLUMNS

SPEEDUP_COLUMN = "best ours vs best baseline"
_ROLE_ORDER = {"ours": 0, "baseline": 1, "reference": 2}


def _case_key(row: dict) -> tuple:
    return (row["shape"], row["batch"], row["K"], row["dtype"], row["mode"], row["stage"])


def group_cases(rows: Iterable[dict]) -> list[list[dict]]:
    """The rows of each case together, cases in first-seen order."""
    cases: dict[tuple, list[dict]] = {}
    for row in rows:
        cases.setdefault(_case_key(row), []).append(row)
    return list(cases.values())


def implementation_order(rows: Iterable[dict]) -> list[str]:
    """Implementation names: ours first, then baselines, then reference points (first-seen within a role)."""
    seen: dict[str, str] = {}
    for row in rows:
        seen.setdefault(row["implementation"], row["role"])
    return sorted(seen, key=lambda name: _ROLE_ORDER[seen[name]])


def fastest_ms(case_rows: Sequence[dict], role: str) -> float | None:
    """The fastest correct median of a role in one case."""
    times = [r["median_ms"] for r in case_rows if r["role"] == role and r["status"] == "ok"]
    return min(times) if times else None


def best_ours_vs_best_baseline(case_rows: Sequence[dict]) -> float | None:
    """Fastest correct baseline time / fastest correct time of ours (> 1: ours wins)."""
    ours, baseline = fastest_ms(case_rows, "ours"), fastest_ms(case_rows, "baseline")
    return baseline / ours if ours and baseline else None


def mode_label(row: dict) -> str:
    return f"stage {row['stage'] + 1}/{row['K']}" if row["mode"] == "stage" else row["mode"]


# ----------------------------------------------------------------------------------------------
# CSV
# ----------------------------------------------------------------------------------------------


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.7g}"
    return str(value)


def write_csv(rows: Sequence[dict], info: dict, path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_value(value) for key, value in (info | row).items()})


_INT_COLUMNS = {"batch", "in_channels", "out_channels", "height", "width", "kernel", "stride", "padding", "K", "stage"}
_FLOAT_COLUMNS = {"useful_gflop", "dense_gflop", "useful_fraction", "min_mbytes", "flop_ideal_ms", "roofline_ms",
                  "max_rel_error", "median_ms", "q25_ms", "q75_ms", "ratio_to_flop_ideal", "ratio_to_roofline",
                  "speedup_vs_dense"}


def read_csv(path: Path) -> tuple[list[dict], dict]:
    """Rows (typed as :func:`write_csv` got them) and the machine columns of the first row."""
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise ValueError(f"{path} does not have the benchmark CSV columns {CSV_COLUMNS}")
        raw_rows = list(reader)
    if not raw_rows:
        raise ValueError(f"{path} has no rows")

    def typed(key: str, value: str):
        if value == "" and (key in _INT_COLUMNS or key in _FLOAT_COLUMNS):
            return None
        return int(value) if key in _INT_COLUMNS else float(value) if key in _FLOAT_COLUMNS else value

    rows = [{key: typed(key, value) for key, value in row.items() if key not in INFO_COLUMNS} for row in raw_rows]
    return rows, {key: raw_rows[0][key] for key in INFO_COLUMNS}


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def _cell(row: dict | None) -> str:
    if row is None:
        return ""
    if row["median_ms"] is None:
        return "n/a" if row["status"].startswith("n/a") else "error"
    cell = f"{row['median_ms']:.3f} ({row['ratio_to_flop_ideal']:.2f}×)"
    return cell + (" WRONG" if row["status"] == "wrong" else "")


def _geomean(values: Sequence[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


_BEST = "best of ours"


def _compared(case_rows: Sequence[dict], ours: str, baseline: str) -> tuple[float, float] | None:
    """(our ms, baseline ms) of one case, or None unless both are correct measurements.

    ``ours`` = :data:`_BEST` with ``baseline`` = ``"best baseline"`` compares the fastest of each role.
    """
    if ours == _BEST:
        mine, theirs = fastest_ms(case_rows, "ours"), fastest_ms(case_rows, "baseline")
        return (mine, theirs) if mine and theirs else None
    by_name = {r["implementation"]: r for r in case_rows}
    mine, theirs = by_name.get(ours), by_name.get(baseline)
    if mine and theirs and mine["status"] == "ok" and theirs["status"] == "ok":
        return mine["median_ms"], theirs["median_ms"]
    return None


def summary_lines(cases: Sequence[Sequence[dict]]) -> list[str]:
    """Per mode, dtype and backend of ours: wins, geometric-mean and worst speedup against each
    baseline, and the geometric-mean ratio to the FLOP-ideal; then best of ours vs best baseline."""
    header = ["mode", "dtype", "ours", "baseline", "cases", "wins", "geomean speedup", "worst",
              "geomean × FLOP-ideal"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups: dict[tuple[str, str], list[Sequence[dict]]] = {}
    for case_rows in cases:
        groups.setdefault((case_rows[0]["mode"], case_rows[0]["dtype"]), []).append(case_rows)
    for (mode, dtype), group in groups.items():
        flat = [row for case_rows in group for row in case_rows]
        roles = {r["implementation"]: r["role"] for r in flat}
        names = implementation_order(flat)
        pairs = [(n, b) for n in names if roles[n] == "ours" for b in names if roles[b] == "baseline"]
        for ours, baseline in [*pairs, (_BEST, "best baseline")]:
            compared = [(c[0]["flop_ideal_ms"], times) for c in group if (times := _compared(c, ours, baseline))]
            if not compared:
                continue
            speedups = [theirs / mine for _, (mine, theirs) in compared]
            ideal_ratios = [mine / ideal for ideal, (mine, _) in compared]
            lines.append("| " + " | ".join([
                mode, dtype, ours, baseline, str(len(compared)), f"{sum(s > 1 for s in speedups)}/{len(speedups)}",
                f"{_geomean(speedups):.2f}×", f"{min(speedups):.2f}×", f"{_geomean(ideal_ratios):.2f}×",
            ]) + " |")
    return lines


def markdown(rows: Sequence[dict], info: dict) -> str:
    cases = group_cases(rows)
    names = implementation_order(rows)
    has_roofline = any(r["roofline_ms"] is not None for r in rows)
    header = ["shape", "N", "K", "dtype", "mode", *names, "FLOP-ideal ms"]
    header += ["roofline ms", "best ours × roofline"] if has_roofline else []
    header += [SPEEDUP_COLUMN]
    roles = {r["implementation"]: r["role"] for r in rows}
    lines = [
        f"# Nested conv benchmark — {info['device']}",
        "",
        *(f"- {key}: {value}" for key, value in info.items()),
        "",
        "Cells: median ms (ratio to the FLOP-ideal = dense time × useful fraction). "
        f"Ours: {', '.join(n for n in names if roles[n] == 'ours')}; baselines: "
        f"{', '.join(n for n in names if roles[n] == 'baseline')}; reference points: "
        f"{', '.join(n for n in names if roles[n] == 'reference')}. "
        f"'{SPEEDUP_COLUMN}' = fastest correct baseline / fastest correct of ours (> 1: ours wins). "
        "Stage rows: output group s alone written into a full `out=` buffer; their baseline is one conv on "
        "the stage's slices, 'grouped' is the stage's diagonal block, FLOP-ideal uses the whole layer's dense "
        "time × the stage's useful fraction. Harness and definitions: `benchmarks/bench_nested_conv.py`.",
        "",
        "## Summary",
        "",
        *summary_lines(cases),
        "",
        "## All cases",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for case_rows in cases:
        first = case_rows[0]
        by_name = {r["implementation"]: r for r in case_rows}
        speedup = best_ours_vs_best_baseline(case_rows)
        cells = [first["shape"], str(first["batch"]), str(first["K"]), first["dtype"], mode_label(first)]
        cells += [_cell(by_name.get(name)) for name in names]
        cells.append(f"{first['flop_ideal_ms']:.3f}")
        if has_roofline:
            roofline = first["roofline_ms"]
            cells.append(f"{roofline:.4f} ({first['roofline_bound']})" if roofline is not None else "")
            best = fastest_ms(case_rows, "ours")
            cells.append(f"{best / roofline:.2f}×" if best and roofline else "")
        cells.append(f"{speedup:.2f}×" if speedup else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------------------


def write_plot(rows: Sequence[dict], info: dict, path: Path) -> None:
    """Per mode and shape: speedup over dense (left) and % of the FLOP-ideal (right), ours and baselines.

    One point per (shape, implementation): the geometric mean over that shape's cases in the mode
    (K, stages, batch sizes, dtypes), so the plot stays readable for any plan; the markdown table
    has every case.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = group_cases(rows)
    modes = list(dict.fromkeys(case_rows[0]["mode"] for case_rows in cases))
    shapes = list(dict.fromkeys(case_rows[0]["shape"] for case_rows in cases))
    names = [n for n in implementation_order(rows)
             if any(r["implementation"] == n and r["role"] != "reference" for r in rows)]
    figure, axes = plt.subplots(len(modes), 2, figsize=(max(12.0, 0.3 * len(shapes)), 4.8 * len(modes)),
                                squeeze=False, constrained_layout=True)
    markers = "os^Dv<>p*h"
    for (left, right), mode in zip(axes, modes, strict=True):
        mode_rows = [r for r in rows if r["mode"] == mode]
        positions = range(len(shapes))
        for index, name in enumerate(names):
            xs, speedups, percents = [], [], []
            for x, shape in zip(positions, shapes, strict=True):
                measured = [r for r in mode_rows if r["shape"] == shape and r["implementation"] == name
                            and r["status"] == "ok" and r["median_ms"] is not None]
                if measured:
                    xs.append(x)
                    speedups.append(_geomean([r["speedup_vs_dense"] for r in measured]))
                    percents.append(100.0 / _geomean([r["ratio_to_flop_ideal"] for r in measured]))
            style = {"marker": markers[index % len(markers)], "linestyle": "none", "label": name, "alpha": 0.8}
            left.plot(xs, speedups, **style)
            right.plot(xs, percents, **style)
        ideal = [(x, _geomean([1.0 / r["useful_fraction"] for r in mode_rows if r["shape"] == shape]))
                 for x, shape in zip(positions, shapes, strict=True) if any(r["shape"] == shape for r in mode_rows)]
        left.plot([x for x, _ in ideal], [v for _, v in ideal], "k_", markersize=12, label="FLOP-ideal")
        left.axhline(1.0, color="grey", linewidth=0.8)
        right.axhline(100.0, color="black", linewidth=0.8, label="FLOP-ideal")
        left.set_yscale("log")
        left.set_ylabel("speedup over dense (×)")
        right.set_ylabel("% of FLOP-ideal speed")
        for axis, title in ((left, "speedup over dense"), (right, "% of FLOP-ideal")):
            axis.set_title(f"{mode}: {title} (geomean over K, stages, N, dtype)", fontsize=10)
            axis.set_xticks(list(positions), shapes, rotation=90, fontsize=7)
            axis.grid(axis="y", alpha=0.3)
        left.legend(fontsize=7)
    figure.suptitle(f"nested conv — {info['device']} ({info.get('cpu', '')}) — torch {info['torch']} — "
                    f"{info['git_commit']} — {info['date']}", fontsize=9)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_reports(rows: Sequence[dict], info: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    """Write ``<stem>.csv``, ``<stem>.md`` and ``<stem>.png`` into ``out_dir``; return their paths."""
    if not rows:
        raise ValueError("no benchmark rows to report")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / f"{stem}.csv", "markdown": out_dir / f"{stem}.md", "plot": out_dir / f"{stem}.png"}
    write_csv(rows, info, paths["csv"])
    paths["markdown"].write_text(markdown(rows, info))
    write_plot(rows, info, paths["plot"])
    return paths


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """Re-render the markdown and the plot from benchmark CSVs, e.g. to merge the parts of a split GPU run."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__)
    parser.add_argument("csv", type=Path, nargs="+", help="benchmark CSV files (same device)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output directory")
    parser.add_argument("--name", required=True, help="file-name stem of the merged outputs")
    args = parser.parse_args(argv)
    rows, info = [], None
    for path in args.csv:
        part_rows, part_info = read_csv(path)
        if info is not None and part_info["device"] != info["device"]:
            raise SystemExit(f"{path} was measured on {part_info['device']}, not {info['device']}")
        info = info or part_info
        rows.extend(part_rows)
    info = info | {"merged from": ", ".join(str(path) for path in args.csv)}
    paths = write_reports(rows, info, args.out, args.name)
    for path in paths.values():
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    main()
