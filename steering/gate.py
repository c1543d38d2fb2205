"""Gated capping: a request is generated uncapped until it shows that it has left the Assistant.

This module is the one place that decides whether a request tripped; the engine feeds it projections
and applies the trip's action. Drift is judged twice at the monitor layer:

- before generating, from the prompt: a system or assistant message whose own tokens' mean
  projection lies below the gate threshold (a persona set up in the system prompt, or earlier turns
  that already drifted) trips the gate before the first token;
- while generating, by a detector that reads the answer as a whole, not token by token: an EWMA of
  the generated tokens' projections, tested once ``warmup`` tokens are out, trips when it falls below
  its threshold. A single low token does not trip it: tau is a low percentile of ordinary tokens, so
  an ordinary answer of a hundred tokens has several below it, and a per-token test applied to every
  token trips on most ordinary answers. The first tokens are exempt because their projections are read
  at the chat template's own positions (token k's projection is taken where token k was produced),
  which no threshold was fitted on.

What a trip does is the operator's choice (``DriftAction``): cap the request from there, flag it and
leave it uncapped, or stop it. A capped trip gets a cap of its own where the axis file has one
(``gated_cap_thresholds``: the same band, a higher tau), so a request that drifted is held harder than
always-on capping holds every request, while ordinary requests, which never trip, are not touched. ``axes calibrate`` measures the prompt threshold (``gate_threshold``)
and the detector (``gate_detector``) from the model's own ordinary answers; an axis file without a
detector uses ``DEFAULT_EWMA_LAMBDA`` and ``DEFAULT_WARMUP`` with tau at the monitor layer as its
threshold (an EWMA of ordinary tokens runs near their mean, far above tau, their low percentile).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from .axis import AssistantAxis

GATE_KEY = "gate_threshold"  # in the axis file's metadata (``AssistantAxis.gate_threshold``)
DETECTOR_KEY = "gate_detector"  # the token detector's parameters, JSON (``AssistantAxis.gate_detector``)
GATED_CAP_KEY = "gated_cap_thresholds"  # the cap a tripped request gets (``AssistantAxis.gated_cap_thresholds``)
GATED_ROLES = ("system", "assistant")  # the messages whose drift the prompt gate reads

DEFAULT_EWMA_LAMBDA = 0.2  # about the last five tokens count
DEFAULT_WARMUP = 4

DriftAction = Literal["cap", "flag", "stop"]
DriftSource = Literal["prompt", "generation"]


@dataclass(frozen=True)
class TokenDetector:
    """An EWMA of one answer's token projections, z_k = lam * p_k + (1 - lam) * z_(k-1), z_1 = p_1;
    it trips at the first token k > ``warmup`` whose z_k lies below ``threshold``."""

    threshold: float
    ewma_lambda: float = DEFAULT_EWMA_LAMBDA
    warmup: int = DEFAULT_WARMUP

    def first_trip(self, projections: Sequence[float | None]) -> tuple[int, float] | None:
        """(0-based token index, EWMA there) where an answer with these projections trips, or None."""
        state = DetectorState(self)
        for k, projection in enumerate(projections):
            if state.observe(projection):
                return k, state.ewma
        return None


class DetectorState:
    """One answer's detector, fed one projection per generated token."""

    def __init__(self, detector: TokenDetector):
        self.detector = detector
        self.ewma: float | None = None
        self.tokens = 0

    def observe(self, projection: float | None) -> bool:
        """True when this token trips it (a token whose projection was lost counts, but moves nothing)."""
        self.tokens += 1
        if projection is None:
            return False
        lam = self.detector.ewma_lambda
        self.ewma = projection if self.ewma is None else lam * projection + (1 - lam) * self.ewma
        return self.tokens > self.detector.warmup and self.ewma < self.detector.threshold


@dataclass(frozen=True)
class Trip:
    """Where and why a gated request tripped: what a response reports and the metrics count."""

    source: DriftSource
    at: int  # the index of the first generated token after the trip (0: before the first token)
    statistic: float  # the message mean (prompt) or the EWMA (generation) that fell below its threshold
    action: DriftAction

    def as_dict(self) -> dict:
        return {"tripped": True, **asdict(self)}


@dataclass(frozen=True)
class CapGate:
    """One request's gate: where its watched messages lie in the prompt, the thresholds, and the action."""

    spans: tuple[tuple[int, int], ...]  # token ranges of the prompt's system and assistant messages
    gate: float  # a watched message whose mean projection is below this has drifted
    detector: TokenDetector
    action: DriftAction = "cap"

    def prompt_trip(self, projections: Sequence[float]) -> Trip | None:
        """A trip before the first token if a watched message's mean lies below the gate threshold."""
        means = [sum(projections[a:b]) / (b - a) for a, b in self.spans if b > a]
        low = min(means, default=None)
        return Trip("prompt", 0, low, self.action) if low is not None and low < self.gate else None

    def watch(self) -> DetectorState:
        return DetectorState(self.detector)


def gate_for(axis: AssistantAxis, spans: tuple[tuple[int, int], ...], action: DriftAction = "cap") -> CapGate:
    """A gated request's gate on this axis: its calibrated thresholds, or the stated defaults."""
    return CapGate(spans, gate_threshold(axis), token_detector(axis), action)


def gate_threshold(axis: AssistantAxis) -> float:
    return axis.gate_threshold if axis.gate_threshold is not None else axis.monitor_tau


def token_detector(axis: AssistantAxis) -> TokenDetector:
    fields = axis.gate_detector
    if fields is None:
        return TokenDetector(axis.monitor_tau)
    return TokenDetector(float(fields["threshold"]), float(fields["ewma_lambda"]), fields["warmup"])
