"""Nesting-order search: the DP against brute force over every monotone path, the hull, bad input, the plot."""

import itertools

import pytest
import torch

from rdn.order import nesting_order, path_area, plot_nesting_order, upper_hull


def random_grid(width: int, depth: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MACs strictly growing along both axes (cumulative sums of positive steps), random accuracies."""
    generator = torch.Generator().manual_seed(seed)
    steps = torch.rand(width, depth, generator=generator, dtype=torch.float64) + 0.1
    macs = steps.cumsum(0).cumsum(1)
    accuracy = torch.rand(width, depth, generator=generator, dtype=torch.float64)
    return macs, accuracy


def all_paths(width: int, depth: int, adjacent: bool) -> list[list[tuple[int, int]]]:
    """Every chain from (0, 0) to (W-1, D-1): subsets of the middle cells that are totally ordered."""
    first, last = (0, 0), (width - 1, depth - 1)
    middle = [(w, d) for w in range(width) for d in range(depth) if (w, d) not in (first, last)]
    paths = []
    for size in range(len(middle) + 1):
        for subset in itertools.combinations(middle, size):
            path = sorted([first, *subset, last]) if first != last else [first]
            steps = list(itertools.pairwise(path))
            grows = all(b[0] >= a[0] and b[1] >= a[1] for a, b in steps)
            unit = all(b[0] - a[0] + b[1] - a[1] == 1 for a, b in steps)
            if grows and (unit or not adjacent):
                paths.append(path)
    return paths


@pytest.mark.parametrize("adjacent", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (4, 1), (1, 3), (2, 2), (3, 2), (3, 3), (2, 4)])
def test_dp_matches_brute_force(shape, adjacent):
    for seed in range(5):
        macs, accuracy = random_grid(*shape, seed)
        order = nesting_order(macs, accuracy, adjacent=adjacent)
        areas = [path_area(macs, accuracy, path) for path in all_paths(*shape, adjacent)]
        assert order.area == pytest.approx(max(areas), rel=1e-12, abs=1e-12)
        assert path_area(macs, accuracy, order.path) == pytest.approx(order.area, rel=1e-12, abs=1e-12)
        assert order.path[0] == (0, 0) and order.path[-1] == (shape[0] - 1, shape[1] - 1)
        for a, b in itertools.pairwise(order.path):
            assert b[0] >= a[0] and b[1] >= a[1] and a != b
            if adjacent:
                assert b[0] - a[0] + b[1] - a[1] == 1


def test_width_only_grid_skips_points_below_the_chord():
    macs = [1.0, 2.0, 3.0, 4.0]
    accuracy = [0.5, 0.55, 0.8, 0.9]  # N2 lies below the chord N1 -> N3
    order = nesting_order(macs, accuracy)
    assert order.path == [(0, 0), (2, 0), (3, 0)]
    assert nesting_order(macs, accuracy, adjacent=True).path == [(0, 0), (1, 0), (2, 0), (3, 0)]


def brute_force_upper_hull(points):
    """Vertices: points strictly above every chord between two other points spanning them, and not
    below any point at the same x; x-extremes with the highest y included."""
    vertices = []
    for i, (x, y) in enumerate(points):
        if any(px == x and py > y for px, py in points):
            continue
        if any(px == x and py == y and j < i for j, (px, py) in enumerate(points)):
            continue
        dominated = False
        for (x0, y0), (x1, y1) in itertools.combinations(points, 2):
            if x0 == x1 or (x0, y0) == (x, y) or (x1, y1) == (x, y):
                continue
            (x0, y0), (x1, y1) = sorted([(x0, y0), (x1, y1)])
            if x0 <= x <= x1 and y <= y0 + (y1 - y0) * (x - x0) / (x1 - x0) + 1e-15:
                dominated = True
                break
        if not dominated:
            vertices.append(i)
    return sorted(vertices, key=lambda i: points[i])


def test_upper_hull_against_brute_force():
    generator = torch.Generator().manual_seed(0)
    for size in (1, 2, 3, 5, 8, 12):
        for _ in range(10):
            # Coarse integer coordinates: repeated x and collinear triples happen often.
            raw = torch.randint(0, 6, (size, 2), generator=generator).tolist()
            points = [(float(x), float(y)) for x, y in raw]
            assert upper_hull(points) == brute_force_upper_hull(points)


def test_hull_bounds_the_order():
    for seed in range(10):
        macs, accuracy = random_grid(3, 3, seed)
        order = nesting_order(macs, accuracy)
        assert order.hull[0] == (0, 0) or macs[order.hull[0]] == macs.min()
        assert order.hull[-1] == (2, 2)
        assert order.hull_area >= order.area - 1e-12
        assert 0 < order.hull_ratio <= 1 + 1e-12
        xs = [macs[c].item() for c in order.hull]
        ys = [accuracy[c].item() for c in order.hull]
        # Every grid point lies on or under the hull's piecewise-linear curve.
        for m, a in zip(macs.flatten().tolist(), accuracy.flatten().tolist(), strict=True):
            for (x0, y0), (x1, y1) in itertools.pairwise(zip(xs, ys, strict=True)):
                if x0 <= m <= x1:
                    assert a <= y0 + (y1 - y0) * (m - x0) / (x1 - x0) + 1e-12


def test_order_follows_the_hull_when_it_is_a_chain():
    macs = [[1.0, 2.0], [3.0, 4.0]]
    accuracy = [[0.2, 0.6], [0.3, 0.7]]  # (0,1) is on the hull, (1,0) below it
    order = nesting_order(macs, accuracy)
    assert order.path == [(0, 0), (0, 1), (1, 1)]
    assert order.hull == order.path
    assert order.hull_ratio == pytest.approx(1.0)


@pytest.mark.parametrize(
    "macs, accuracy, error, match",
    [
        ([[1.0, 2.0]], [[0.1]], ValueError, "same shape"),
        ([], [], ValueError, "non-empty"),
        ([1.0, 1.0], [0.1, 0.2], ValueError, "grow strictly"),
        ([[1.0, 0.5]], [[0.1, 0.2]], ValueError, "grow strictly"),
        ([1.0, float("nan")], [0.1, 0.2], ValueError, "finite"),
    ],
)
def test_bad_input(macs, accuracy, error, match):
    with pytest.raises(error, match=match):
        nesting_order(macs, accuracy)


def test_adjacent_must_be_bool():
    with pytest.raises(TypeError, match="adjacent"):
        nesting_order([1.0, 2.0], [0.1, 0.2], adjacent="yes")


def test_plot_writes_png(tmp_path):
    macs, accuracy = random_grid(3, 2, 0)
    order = nesting_order(macs, accuracy)
    out = plot_nesting_order(macs, accuracy, order, tmp_path / "sub" / "order.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
