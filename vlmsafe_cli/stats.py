"""Confidence intervals for reported numbers: Wilson score for proportions, percentile bootstrap otherwise."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np


def proportion_ci(outcomes: Sequence[bool], confidence: float = 0.95) -> tuple[float, float, float]:
    """(rate, low, high): the Wilson score interval (Wilson 1927), sound at rates near 0 or 1 and small n."""
    n = len(outcomes)
    if n == 0:
        raise ValueError("a rate needs at least one outcome")
    rate = sum(bool(o) for o in outcomes) / n
    z = _z(confidence)
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return rate, max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[np.ndarray], float] = np.mean,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(statistic, low, high): percentile bootstrap over the values, seeded."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("a bootstrap needs at least one value")
    rng = np.random.default_rng(seed)
    resamples = data[rng.integers(0, data.size, size=(n_resamples, data.size))]
    stats = np.array([statistic(sample) for sample in resamples])
    tail = (1 - confidence) / 2
    return float(statistic(data)), float(np.quantile(stats, tail)), float(np.quantile(stats, 1 - tail))


def _z(confidence: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)
