"""Confidence intervals for the figures the axis tools and the eval report print (shares, means and ROC
AUCs over a few items)."""

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


def roc_auc(positive: list[float], negative: list[float]) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def auc_ci(auc: float, n_positive: int, n_negative: int, z: float = Z95) -> tuple[float, float]:
    """95% interval of a ROC AUC from its standard error (Hanley and McNeil 1982), clipped to [0, 1]."""
    if n_positive == 0 or n_negative == 0:
        return (0.0, 1.0)
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (n_positive - 1) * (q1 - auc * auc) + (n_negative - 1) * (q2 - auc * auc)) \
        / (n_positive * n_negative)
    half = z * math.sqrt(max(variance, 0.0))
    return (max(0.0, auc - half), min(1.0, auc + half))
