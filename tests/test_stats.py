"""The paired statistics behind the eval's persona effect, against direct computations."""

from __future__ import annotations

import math
import random
from fractions import Fraction
from itertools import product
from math import comb

import pytest

from axiscap.axes.stats import (cluster_bootstrap, crossed_bootstrap, delong_difference, mcnemar_exact,
                                 percentile_interval, rank_auc, roc_auc)
from axiscap.evals.run import paired_persona_effect


def _two_sided_binomial(k: int, n: int) -> float:
    """Sum of the probabilities of every split at most as likely as k of n (Binomial(n, 1/2))."""
    p = [Fraction(comb(n, i), 2 ** n) for i in range(n + 1)]
    return float(sum(q for q in p if q <= p[k]))


def test_mcnemar_exact_equals_the_two_sided_binomial_test():
    for lost, gained in product(range(9), repeat=2):
        n = lost + gained
        expected = 1.0 if n == 0 else _two_sided_binomial(lost, n)
        assert abs(mcnemar_exact(lost, gained) - expected) < 1e-12, (lost, gained)
    assert abs(mcnemar_exact(3, 0) - 0.25) < 1e-12  # the eval's "75% → 60%": 3 lost, none gained


def test_cluster_bootstrap_with_one_item_per_cluster_is_the_plain_bootstrap():
    values = [0.3, 1.2, -0.5, 2.0, 0.9, 1.1, -1.4, 0.0]
    lo, hi = cluster_bootstrap([[v] for v in values], lambda xs: sum(xs) / len(xs), resamples=500, seed=7)
    rng = random.Random(7)
    means = sorted(sum(d) / len(d) for d in (rng.choices(values, k=len(values)) for _ in range(500)))
    assert (lo, hi) == (means[int(0.025 * 499)], means[-1 - int(0.025 * 499)])


def test_cluster_bootstrap_moves_whole_clusters():
    # Two clusters of ten identical answers: resampled as clusters, the mean is 0, 0.5 or 1; resampled as
    # twenty independent answers it would take many values in between.
    clusters = [[0.0] * 10, [1.0] * 10]
    lo, hi = cluster_bootstrap(clusters, lambda xs: sum(xs) / len(xs), resamples=400)
    assert (lo, hi) == (0.0, 1.0)
    assert cluster_bootstrap([[1.0]], lambda xs: None) is None


def test_paired_persona_effect_counts_each_persona_on_its_own_answers():
    # 6 personas; uncapped: in character on both kinds for personas 0–3; capped: only persona 0 stays in
    # character on the harmful request, and persona 5 (out of character uncapped) gains it on benign.
    records = []
    for i in range(6):
        for kind in ("harmful", "benign"):
            uncapped = i < 4
            capped = (i == 0 and kind == "harmful") or (i == 5 and kind == "benign")
            records += [{"id": f"p{i}", "kind": kind, "condition": "uncapped", "in_character": uncapped},
                        {"id": f"p{i}", "kind": kind, "condition": "capped", "in_character": capped}]
    effect = paired_persona_effect(records, "capped")
    harmful, both = effect["harmful"], effect["both kinds"]
    assert (harmful["pairs"], harmful["uncapped"], harmful["capped"], harmful["lost"], harmful["gained"]) == (6, 4, 1, 3, 0)
    assert harmful["reduction"] == 0.75 and abs(harmful["mcnemar_p"] - 0.25) < 1e-4
    assert (both["pairs"], both["uncapped"], both["capped"], both["lost"], both["gained"]) == (12, 8, 2, 7, 1)
    assert both["reduction"] == 0.75 and abs(both["mcnemar_p"] - mcnemar_exact(7, 1)) < 1e-4
    lo, hi = both["reduction_ci"]
    assert lo < 0.75 < hi <= 1  # six personas: a wide interval around the point


def test_rank_auc_equals_the_pairwise_count_with_ties():
    rng = random.Random(3)
    for _ in range(50):
        pos = [rng.choice([0.0, 0.5, 1.0, 1.5, 2.0]) for _ in range(rng.randint(1, 12))]
        neg = [rng.choice([0.0, 0.5, 1.0, 1.5]) for _ in range(rng.randint(1, 12))]
        assert abs(rank_auc(pos, neg) - roc_auc(pos, neg)) < 1e-12


def test_crossed_bootstrap_draws_questions_and_roles_and_keeps_their_answers_together():
    # 2 questions with 2 default answers each; roles r1, r2 each answered both questions.
    default_questions = ["q1", "q1", "q2", "q2"]
    cells = [("r1", "q1"), ("r1", "q2"), ("r2", "q1"), ("r2", "q2")]
    seen = []
    crossed_bootstrap(default_questions, cells, lambda d, p: seen.append((sorted(d), sorted(p))) or 0.0,
                      resamples=200, seed=1)
    for d, p in seen:
        # A question's default answers come in together, once per draw of the question...
        n_q = {"q1": d.count(0), "q2": d.count(2)}
        assert d.count(1) == n_q["q1"] and d.count(3) == n_q["q2"] and sum(n_q.values()) == 2
        # ...and a role answer once per draw of its role times its question's.
        asked = "q1" if n_q["q1"] else "q2"
        n_r = {"r1": p.count(cells.index(("r1", asked))) // n_q[asked],
               "r2": p.count(cells.index(("r2", asked))) // n_q[asked]}
        assert sum(n_r.values()) == 2
        assert [p.count(i) for i in range(4)] == [n_r[r] * n_q[q] for r, q in cells]
    assert len({tuple(map(tuple, x)) for x in seen}) > 3  # the draws differ
    assert percentile_interval([]) is None


def test_delong_difference_equals_the_placement_value_formula_computed_directly():
    rng = random.Random(3)
    pos_a = [rng.gauss(1.0, 1) for _ in range(12)]
    neg_a = [rng.gauss(0.0, 1) for _ in range(9)]
    pos_b = [x + rng.gauss(0, 1.5) for x in pos_a]  # the same answers, a noisier score
    neg_b = [round(x + rng.gauss(0, 1.5), 0) for x in neg_a]  # with ties
    pos_b[0] = neg_b[0]

    def psi(x, y):
        return 1.0 if x > y else 0.5 if x == y else 0.0

    def cov(u, v):
        mu, mv = sum(u) / len(u), sum(v) / len(v)
        return sum((a - mu) * (b - mv) for a, b in zip(u, v)) / (len(u) - 1)

    v10 = {k: [sum(psi(x, y) for y in neg) / len(neg) for x in pos] for k, (pos, neg) in
           {"a": (pos_a, neg_a), "b": (pos_b, neg_b)}.items()}
    v01 = {k: [sum(psi(x, y) for x in pos) / len(pos) for y in neg] for k, (pos, neg) in
           {"a": (pos_a, neg_a), "b": (pos_b, neg_b)}.items()}
    variance = ((cov(v10["a"], v10["a"]) + cov(v10["b"], v10["b"]) - 2 * cov(v10["a"], v10["b"])) / 12
                + (cov(v01["a"], v01["a"]) + cov(v01["b"], v01["b"]) - 2 * cov(v01["a"], v01["b"])) / 9)
    difference = roc_auc(pos_a, neg_a) - roc_auc(pos_b, neg_b)
    d = delong_difference(pos_a, neg_a, pos_b, neg_b)
    assert d["difference"] == pytest.approx(difference)
    assert d["ci"] == pytest.approx([difference - 1.96 * variance ** 0.5, difference + 1.96 * variance ** 0.5])
    assert d["p"] == pytest.approx(math.erfc(abs(difference) / variance ** 0.5 / math.sqrt(2)))


def test_delong_difference_of_a_score_with_itself_is_zero():
    pos, neg = [3.0, 2.0, 5.0], [1.0, 2.0, 0.5]
    assert delong_difference(pos, neg, pos, neg) == {"difference": 0.0, "ci": [0.0, 0.0], "p": 1.0}
