"""Confidence intervals for the figures the axis tools and the eval report print (shares, means and ROC
AUCs over a few items), and the paired tests behind "capping changed this"."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

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


def mcnemar_exact(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p of paired yes/no outcomes: of the discordant pairs (``lost``: yes
    before, no after; ``gained``: the reverse), how unlikely a split this uneven is if each direction
    were equally likely (binomial, one half)."""
    n = lost + gained
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(lost, gained) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def discordant(pairs: list[tuple[bool, bool]]) -> dict:
    """Paired yes/no outcomes ``(before, after)``: how many were lost (yes, then no) and gained, and the
    exact McNemar p of that split (four places)."""
    lost = sum(b and not a for b, a in pairs)
    gained = sum(a and not b for b, a in pairs)
    return {"lost": lost, "gained": gained, "mcnemar_p": round(mcnemar_exact(lost, gained), 4)}


def cluster_bootstrap(clusters: list[list], statistic: Callable[[list], float | None],
                      resamples: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """95% percentile interval of ``statistic`` over the pooled items when whole clusters (a role's or a
    question's answers, which are not independent of each other) are resampled with replacement.
    Resamples where the statistic is undefined (None) are left out; None if every one is."""
    rng = random.Random(seed)
    return percentile_interval([v for v in (statistic([x for c in rng.choices(clusters, k=len(clusters)) for x in c])
                                            for _ in range(resamples)) if v is not None])


def crossed_bootstrap(default_questions: list[str], role_cells: list[tuple[str, str]],
                      statistic: Callable[[list[int], list[int]], float], resamples: int = 1000,
                      seed: int = 0) -> list[float]:
    """``statistic`` over resamples of a crossed design: answers to the same question are not
    independent, nor are answers in the same role. Each resample draws the questions and the roles
    with replacement; a default answer comes in once per draw of its question, a role answer (its
    ``(role, question)`` cell) once per draw of its role times its question's. ``statistic`` takes the
    drawn indices into the default answers and into the role answers."""
    rng = random.Random(seed)
    questions = sorted(set(default_questions) | {q for _, q in role_cells})
    roles = sorted({r for r, _ in role_cells})
    default_by_q = {q: [i for i, d in enumerate(default_questions) if d == q] for q in questions}
    cell = {}
    for i, key in enumerate(role_cells):
        cell.setdefault(key, []).append(i)
    values = []
    for _ in range(resamples):
        qs, rs = rng.choices(questions, k=len(questions)), rng.choices(roles, k=len(roles))
        default = [i for q in qs for i in default_by_q[q]]
        played = [i for r in rs for q in qs for i in cell.get((r, q), ())]
        if default and played:
            values.append(statistic(default, played))
    return values


def percentile_interval(values: list[float]) -> tuple[float, float] | None:
    """The 2.5th and 97.5th percentiles of bootstrap values (None if there are none)."""
    if not values:
        return None
    values = sorted(values)
    return values[int(0.025 * (len(values) - 1))], values[int(math.ceil(0.975 * (len(values) - 1)))]


def rank_auc(positive: list[float], negative: list[float]) -> float:
    """``roc_auc`` in n log n (scikit-learn's, ties counting half), for bootstraps."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score([1] * len(positive) + [0] * len(negative), [*positive, *negative]))


def delong_difference(positive_a: list[float], negative_a: list[float], positive_b: list[float],
                      negative_b: list[float], z: float = Z95) -> dict:
    """DeLong, DeLong and Clarke-Pearson (1988): two scores of the same positives and negatives (item i
    of ``positive_a`` and of ``positive_b`` is one answer), AUC by a minus AUC by b with the variance of
    their paired difference from each answer's placement values; a 95% interval and a two-sided p.
    Assumes independent answers: the crossed bootstrap is the interval that does not."""
    import numpy as np

    def placements(pos, neg):
        pos, neg = np.asarray(pos, float)[:, None], np.asarray(neg, float)[None, :]
        psi = (pos > neg) + 0.5 * (pos == neg)  # [positives, negatives]
        return psi.mean(1), psi.mean(0)  # per positive (V10), per negative (V01)

    (v10a, v01a), (v10b, v01b) = placements(positive_a, negative_a), placements(positive_b, negative_b)
    s10, s01 = np.cov(np.stack([v10a, v10b])), np.cov(np.stack([v01a, v01b]))
    contrast = np.array([1.0, -1.0])
    variance = contrast @ s10 @ contrast / len(v10a) + contrast @ s01 @ contrast / len(v01a)
    difference = float(v10a.mean() - v10b.mean())
    if variance <= 0:  # the two scores rank every pair alike
        return {"difference": difference, "ci": [difference, difference], "p": 1.0 if difference == 0 else 0.0}
    sd = math.sqrt(variance)
    return {"difference": difference, "ci": [difference - z * sd, difference + z * sd],
            "p": math.erfc(abs(difference) / sd / math.sqrt(2))}
