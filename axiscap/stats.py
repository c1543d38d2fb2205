"""Confidence intervals for the figures the reports print (shares and means over a few items)."""

from __future__ import annotations

import math

Z95 = 1.96


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a share: stays inside [0, 1] and is honest at 0 or n successes."""
    if n == 0:
        return (0.0, 1.0)
    p, d = successes / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_ci(values: list[float], z: float = Z95) -> tuple[float, float, float]:
    """Mean and its normal-approximation 95% interval."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("inf")
    return mean, mean - z * sd / math.sqrt(n), mean + z * sd / math.sqrt(n)
