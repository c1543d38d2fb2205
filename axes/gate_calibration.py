"""Calibrating gated capping's token detector (``steering.gate.TokenDetector``) per answer.

The detector must leave ordinary answers alone as whole answers: at most ``FALSE_TRIP`` of the train
answers may ever trip it, however long they are. So each answer is replayed exactly as the server
sees it (``teacher_forced``'s ``served``): token k's projection is read at the position that produced
it (the first at the prompt's last position), at the monitor layer, uncapped. For every candidate
(EWMA lambda, warm-up), an answer's statistic is the lowest EWMA after the warm-up; the threshold is
the train answers' k-th lowest statistic, k = ``FALSE_TRIP`` of them rounded down, so that at most
that share trips. The candidate is chosen on the validation split's ordinary answers against the
role-play answers (ROC AUC of the statistic), and its trip rates there are reported with their
counts. The validation split chose it, so those rates are not a held-out test.
"""

from __future__ import annotations

import json
import math

from axiscap.steering import AssistantAxis
from axiscap.steering.gate import TokenDetector

from .stats import roc_auc, wilson
from .teacher_forcing import teacher_forced

FALSE_TRIP = 0.05  # the share of ordinary (train) answers allowed to trip the detector
LAMBDAS = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
WARMUPS = (0, 2, 4, 8, 16)


def lowest_ewma(projections: list[float], ewma_lambda: float, warmup: int) -> float:
    """The lowest EWMA an answer reaches after the warm-up (inf if it ends before): it trips a detector
    with these parameters exactly when this lies below the threshold."""
    z, low = None, math.inf
    for k, p in enumerate(projections, start=1):
        z = p if z is None else ewma_lambda * p + (1 - ewma_lambda) * z
        if k > warmup:
            low = min(low, z)
    return low


def _share(values: list[float], threshold: float) -> dict:
    k, n = sum(v < threshold for v in values), len(values)
    return {"tripped": k, "n": n, "share": k / n if n else None, "ci": wilson(k, n)}


def calibrate_detector(train: list[list[float]], validation: list[list[float]], role: list[list[float]],
                       max_tokens: int) -> tuple[TokenDetector, dict]:
    """The detector for these trajectories, and the record of how it was chosen (for the axis file)."""
    candidates = []
    for lam in LAMBDAS:
        for warmup in WARMUPS:
            fitted = sorted(lowest_ewma(t, lam, warmup) for t in train)
            # The k-th lowest, k = FALSE_TRIP of the answers (rounded down): the k below it trip, no more.
            threshold = fitted[int(FALSE_TRIP * len(fitted))]
            if not math.isfinite(threshold):  # most answers end before the warm-up: nothing to fit
                continue
            neutral = [lowest_ewma(t, lam, warmup) for t in validation]
            drifting = [lowest_ewma(t, lam, warmup) for t in role]
            # Lower is more drifted: the positives (role answers) should score higher on -low.
            auc = roc_auc([-v for v in drifting], [-v for v in neutral]) if neutral and drifting else None
            candidates.append({"ewma_lambda": lam, "warmup": warmup, "threshold": threshold, "auc": auc,
                               "train": _share(fitted, threshold), "validation": _share(neutral, threshold),
                               "role": _share(drifting, threshold)})
    if not candidates:
        raise ValueError("no answer is longer than the longest warm-up: nothing to calibrate the detector on")
    best = max(candidates, key=lambda c: (c["auc"] if c["auc"] is not None else -1, c["role"]["tripped"]))
    detector = TokenDetector(best["threshold"], best["ewma_lambda"], best["warmup"])
    record = {"threshold": detector.threshold, "ewma_lambda": detector.ewma_lambda, "warmup": detector.warmup,
              "false_trip": FALSE_TRIP, "max_tokens": max_tokens, "chosen_by": "validation vs role ROC AUC",
              "auc": best["auc"], "train": best["train"], "validation": best["validation"], "role": best["role"]}
    return detector, record


def detector_metadata(model, axis: AssistantAxis, rows: list[dict], max_tokens: int, batch_size: int = 8) -> str:
    """The axis file's ``gate_detector`` entry (JSON) from answered calibration rows (``kind``: train,
    validation or role), read at ``axis``'s monitor layer."""
    trajectories = teacher_forced(model, rows, axis, capping=False, batch_size=batch_size,
                                  desc="token detector")["served"]
    by_kind = {kind: [t for r, t in zip(rows, trajectories) if r["kind"] == kind]
               for kind in ("train", "validation", "role")}
    _, record = calibrate_detector(by_kind["train"], by_kind["validation"], by_kind["role"], max_tokens)
    return json.dumps(record)
