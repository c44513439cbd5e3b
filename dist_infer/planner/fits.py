"""Small fitted curves the cost model reads back from a profile: piecewise-linear tables and non-negative linear fits."""

from __future__ import annotations

import bisect
from collections import defaultdict

import numpy as np
from scipy.optimize import nnls


def table(xs: list[float], ys: list[float]) -> dict:
    """A piecewise-linear curve through the medians of ``ys`` at each distinct ``x``."""
    groups: dict[float, list[float]] = defaultdict(list)
    for x, y in zip(xs, ys):
        groups[x].append(y)
    keys = sorted(groups)
    return {"x": keys, "y": [float(np.median(groups[k])) for k in keys]}


def interpolate(curve: dict, x: float) -> float:
    """The curve at ``x``: linear between points, constant below the first, and above the last extended along the
    line from the origin-anchored slope of the last point (work past the measured range grows proportionally)."""
    xs, ys = curve["x"], curve["y"]
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        if len(xs) == 1 or xs[-1] <= 0:
            return ys[-1]
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return ys[-1] + max(slope, 0.0) * (x - xs[-1])
    i = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def linear_fit(features: list[dict[str, float]], ys: list[float], names: list[str]) -> dict[str, float]:
    """Non-negative least squares ``y ≈ Σ c_n f_n``, fitted in relative error (each row divided by its y, so that
    small steps weigh as much as large ones)."""
    a = np.array([[f.get(n, 0.0) for n in names] for f in features], dtype=np.float64)
    y = np.array(ys, dtype=np.float64)
    weight = 1.0 / np.maximum(y, 1e-9)
    scale = np.maximum(np.abs(a).max(axis=0), 1e-30)  # columns of very different magnitudes
    coef, _ = nnls(a / scale * weight[:, None], y * weight)
    return {n: float(c / s) for n, c, s in zip(names, coef, scale)}


def evaluate(coef: dict[str, float], features: dict[str, float]) -> float:
    return sum(c * features.get(n, 0.0) for n, c in coef.items())
