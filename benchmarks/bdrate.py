"""Bjøntegaard delta rate: the average rate difference of two rate-quality curves at equal quality.

Log-rate is interpolated as a function of quality with monotone piecewise-cubic (PCHIP) curves and
averaged over the quality interval both curves cover. An anchor with a single point (fp16 is one rate)
reduces to the rate difference at that point's quality.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Point = tuple[float, float]  # (rate, quality)


def _curve(points: Sequence[Point], higher_is_better: bool) -> tuple[np.ndarray, np.ndarray]:
    """Quality (strictly increasing, 'better' upwards) and log-rate, keeping the cheapest rate per quality."""
    best: dict[float, float] = {}
    for rate, quality in points:
        q = quality if higher_is_better else -quality
        best[q] = min(rate, best.get(q, math.inf))
    qualities = np.array(sorted(best))
    return qualities, np.log(np.array([best[q] for q in qualities]))


def bd_rate(anchor: Sequence[Point], test: Sequence[Point], higher_is_better: bool = True) -> float | None:
    """Percent rate change of ``test`` against ``anchor`` at equal quality; None if the curves don't overlap.

    Negative means ``test`` needs fewer bits.
    """
    from scipy.interpolate import PchipInterpolator

    if not anchor or not test:
        return None
    qa, ra = _curve(anchor, higher_is_better)
    qt, rt = _curve(test, higher_is_better)
    if len(qt) == 1 and len(qa) == 1:
        return None
    if len(qa) == 1 or len(qt) == 1:
        single_q, single_r, other_q, other_r, sign = (
            (qa[0], ra[0], qt, rt, 1.0) if len(qa) == 1 else (qt[0], rt[0], qa, ra, -1.0)
        )
        if not other_q[0] <= single_q <= other_q[-1]:
            return None
        other_at = float(PchipInterpolator(other_q, other_r)(single_q))
        return 100.0 * (math.exp(sign * (other_at - single_r)) - 1.0)
    low, high = max(qa[0], qt[0]), min(qa[-1], qt[-1])
    if high <= low:
        return None
    grid = np.linspace(low, high, 200)
    difference = PchipInterpolator(qt, rt)(grid) - PchipInterpolator(qa, ra)(grid)
    return 100.0 * (math.exp(float(np.mean(difference))) - 1.0)
