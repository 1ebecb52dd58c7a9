"""Learning the nesting order (DESIGN.md §6, paper §3.3 and Figure 6).

Sub-networks vary in width (number of channel groups) and depth (depth splits), a 2-D grid; cell
(w, d) sits at (MACs, accuracy). Sub-network (w', d') contains (w, d) when w' ≥ w and d' ≥ d, so
a nesting order is a *chain* of this partial order: a path from the smallest cell (0, 0) to the
largest (W−1, D−1) that grows in both coordinates at every step (``adjacent=True``: by one width
group or one depth split per step, the transitions of Figure 6 left). The order chosen maximises
the area under its piecewise-linear accuracy-vs-MACs curve; since every path spans the same MAC
range, that is a longest path in a DAG, solved exactly by dynamic programming. The upper convex
hull of all points is reported beside it (the order's area can only approach the hull's).
A grid whose depth dimension has size 1 (width nesting only) is a special case.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["NestingOrder", "nesting_order", "path_area", "plot_nesting_order", "upper_hull"]

Cell = tuple[int, int]


def _as_grid(values, name: str) -> Tensor:
    grid = torch.as_tensor(values, dtype=torch.float64)
    if grid.dim() == 1:
        grid = grid[:, None]
    if grid.dim() != 2 or grid.numel() == 0:
        raise ValueError(f"{name} must be a non-empty (width, depth) grid or 1-D width list, got {tuple(grid.shape)}")
    if not bool(torch.isfinite(grid).all()):
        raise ValueError(f"{name} must be finite everywhere")
    return grid


def path_area(macs: Tensor, accuracy: Tensor, path: Sequence[Cell]) -> float:
    """Area under the piecewise-linear accuracy-vs-MACs curve through the cells of ``path`` (trapezoids)."""
    area = 0.0
    for (w0, d0), (w1, d1) in itertools.pairwise(path):
        area += (macs[w1, d1] - macs[w0, d0]).item() * 0.5 * (accuracy[w0, d0] + accuracy[w1, d1]).item()
    return area


def upper_hull(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the vertices of the upper convex hull of (x, y) points, left to right.

    Andrew's monotone chain on the points sorted by (x, y); collinear middle points are dropped,
    of several points with the same x only the highest can be a vertex, of equal points the first.
    """
    order = sorted(range(len(points)), key=lambda i: points[i])
    hull: list[int] = []
    for i in order:
        x, y = points[i]
        if hull and tuple(points[hull[-1]]) == (x, y):
            continue
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = points[hull[-2]], points[hull[-1]]
            # Pop the last vertex unless it lies strictly above the chord from hull[-2] to i.
            if (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) >= 0:
                hull.pop()
            else:
                break
        if hull and points[hull[-1]][0] == x:  # same x, higher y (sorted): replaces it
            hull.pop()
        hull.append(i)
    return hull


@dataclass
class NestingOrder:
    """The chosen nesting order and its comparison with the upper convex hull.

    Attributes:
        path: cells (width index, depth index) from (0, 0) to (W−1, D−1), 0-based.
        area: area under the accuracy-vs-MACs curve along ``path``.
        hull: cells of the upper convex hull vertices, by increasing MACs (may break the
            topological constraint; it is the unconstrained bound).
        hull_area: area under the hull between the smallest and largest MACs.
    """

    path: list[Cell]
    area: float
    hull: list[Cell]
    hull_area: float

    @property
    def hull_ratio(self) -> float:
        """area / hull_area (1 when the order follows the hull)."""
        return self.area / self.hull_area if self.hull_area else 1.0


def nesting_order(macs, accuracy, adjacent: bool = False) -> NestingOrder:
    """Choose the nesting order on a grid of sub-networks (module docstring).

    Args:
        macs: (W, D) MACs of sub-network (w, d), or a length-W list for a width-only grid. Must grow
            strictly along both axes (a containing sub-network costs more).
        accuracy: (W, D) accuracy (any scale) of every sub-network, same shape.
        adjacent: only steps that add one width group or one depth split; default: any step to
            a containing sub-network (sub-networks may be skipped).
    """
    macs, accuracy = _as_grid(macs, "macs"), _as_grid(accuracy, "accuracy")
    if macs.shape != accuracy.shape:
        raise ValueError(f"macs {tuple(macs.shape)} and accuracy {tuple(accuracy.shape)} must have the same shape")
    if not isinstance(adjacent, bool):
        raise TypeError(f"adjacent must be a bool, got {adjacent!r}")
    if bool((macs[1:] <= macs[:-1]).any()) or bool((macs[:, 1:] <= macs[:, :-1]).any()):
        raise ValueError("macs must grow strictly with width (axis 0) and depth (axis 1): a sub-network costs "
                         "more than every sub-network it contains")
    width, depth = macs.shape
    # Cells sorted by MACs are a topological order of the containment DAG (MACs grow along it).
    cells = sorted(((w, d) for w in range(width) for d in range(depth)), key=lambda c: macs[c].item())
    best: dict[Cell, float] = {(0, 0): 0.0}
    previous: dict[Cell, Cell] = {}

    def trapezoid(a: Cell, b: Cell) -> float:
        return (macs[b] - macs[a]).item() * 0.5 * (accuracy[a] + accuracy[b]).item()

    for cell in cells:
        if cell == (0, 0):
            continue
        w, d = cell
        if adjacent:
            sources = [c for c in ((w - 1, d), (w, d - 1)) if min(c) >= 0]
        else:
            sources = [(a, b) for a in range(w + 1) for b in range(d + 1) if (a, b) != cell]
        candidates = [(best[c] + trapezoid(c, cell), c) for c in sources if c in best]
        best[cell], previous[cell] = max(candidates, key=lambda item: item[0])
    last = (width - 1, depth - 1)
    path = [last]
    while path[-1] != (0, 0):
        path.append(previous[path[-1]])
    path.reverse()

    flat = [(w, d) for w in range(width) for d in range(depth)]
    hull = [flat[i] for i in upper_hull([(macs[c].item(), accuracy[c].item()) for c in flat])]
    return NestingOrder(path, best[last], hull, path_area(macs, accuracy, hull))


def plot_nesting_order(macs, accuracy, order: NestingOrder, path: str | Path, title: str = "Nesting order") -> Path:
    """PNG in the form of the paper's Figure 6 (right): every sub-network at (MACs, accuracy),
    the chosen order in red, the upper convex hull dashed. Returns the written path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    macs, accuracy = _as_grid(macs, "macs"), _as_grid(accuracy, "accuracy")
    figure, axes = plt.subplots(figsize=(6, 4.5))
    width, depth = macs.shape
    for w in range(width):
        for d in range(depth):
            axes.scatter(macs[w, d].item() / 1e6, accuracy[w, d].item(), color="tab:blue", zorder=3)
            label = f"({w + 1},{d + 1})" if depth > 1 else f"N{w + 1}"
            axes.annotate(label, (macs[w, d].item() / 1e6, accuracy[w, d].item()), fontsize=7,
                          xytext=(3, -9), textcoords="offset points")
    for cells, style in ((order.hull, dict(color="gray", linestyle="--", label="upper convex hull")),
                         (order.path, dict(color="red", label="nesting order"))):
        axes.plot([macs[c].item() / 1e6 for c in cells], [accuracy[c].item() for c in cells], **style)
    axes.set_xlabel("MMACs per sample")
    axes.set_ylabel("accuracy")
    axes.set_title(f"{title} (area {order.hull_ratio:.4f} of the hull's)")
    axes.legend(loc="lower right")
    axes.grid(alpha=0.3)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
