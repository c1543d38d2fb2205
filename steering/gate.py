"""Gated capping: a request is generated uncapped until it shows that it has left the Assistant.

Capping every token changes some ordinary answers (see the eval report). The gate caps only where a
conversation has drifted, judged twice at the monitor layer:

- before generating, from the prompt: a system or assistant message whose own tokens' mean
  projection lies below the gate threshold (a persona set up in the system prompt, or earlier
  turns that already drifted) caps the request from its first token on;
- while generating: a generated token whose projection lies below tau caps the request from the
  next token on.

Once on, capping stays on for the rest of the request. The gate threshold is calibrated from the
default Assistant's own answers (``axes calibrate`` stores it as ``gate_threshold``); an axis file
without one uses tau at the monitor layer, which per-token projections of ordinary answers fall
below only rarely (tau is a low percentile of them) and whole-message means far more rarely still.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .axis import AssistantAxis

GATE_KEY = "gate_threshold"  # in the axis file's metadata (``AssistantAxis.gate_threshold``)
GATED_ROLES = ("system", "assistant")  # the messages whose drift the prompt gate reads


def gate_threshold(axis: AssistantAxis) -> float:
    return axis.gate_threshold if axis.gate_threshold is not None else axis.monitor_tau


@dataclass(frozen=True)
class CapGate:
    """One request's gate: where its watched messages lie in the prompt, and the two thresholds."""

    spans: tuple[tuple[int, int], ...]  # token ranges of the prompt's system and assistant messages
    gate: float  # a watched message whose mean projection is below this has drifted
    tau: float  # a generated token whose projection is below this switches capping on

    def prompt_drifted(self, projections: Sequence[float]) -> bool:
        return any(sum(projections[a:b]) / (b - a) < self.gate for a, b in self.spans if b > a)

    def token_drifted(self, projection: float | None) -> bool:
        return projection is not None and projection < self.tau
