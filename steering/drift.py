"""How far a conversation has drifted from the Assistant, from the projections of its messages.

The paper's central observation is drift across turns: in some kinds of conversation each assistant
turn sits further from the Assistant than the last. Given the mean monitor projection of each
assistant turn of a conversation, in order, two statistics from statistical process control watch
that sequence against tau (the cap threshold at the monitor layer):

- an EWMA, z_k = lambda * m_k + (1 - lambda) * z_(k-1), z_1 = m_1: the recent level, with
  ``EWMA_LAMBDA`` weighting the newest turn (0.3: about the last three turns count);
- a one-sided CUSUM against tau, S_k = max(0, S_(k-1) + (tau - m_k) - slack), S_0 = 0: it grows while
  turns sit below tau by more than the slack, and only then; the slack is ``CUSUM_SLACK_SDS`` standard
  deviations of the default Assistant's per-token projections where the axis file records them
  (``monitor_std``), else 0: a turn mean that far below tau counts as noise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

EWMA_LAMBDA = 0.3
CUSUM_SLACK_SDS = 0.1


@dataclass(frozen=True)
class Drift:
    assistant_turns: int
    ewma: float | None  # None without assistant turns
    cusum: float
    tau: float
    ewma_lambda: float
    cusum_slack: float

    def as_dict(self) -> dict:
        return asdict(self)


def conversation_drift(turn_means: list[float], tau: float, assistant_std: float | None = None) -> Drift:
    slack = CUSUM_SLACK_SDS * assistant_std if assistant_std else 0.0
    ewma, cusum = None, 0.0
    for mean in turn_means:
        ewma = mean if ewma is None else EWMA_LAMBDA * mean + (1 - EWMA_LAMBDA) * ewma
        cusum = max(0.0, cusum + (tau - mean) - slack)
    return Drift(len(turn_means), ewma, cusum, tau, EWMA_LAMBDA, slack)
