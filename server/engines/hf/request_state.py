"""What the transformers engine keeps per request, declared on the request itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from axiscap.steering.gate import DetectorState, Trip

from ..base import Logprob, Request, SamplingParams
from .text_output import IncrementalDetokenizer, StopMatcher


@dataclass
class Row:
    """Host-side state of one request, from submission to its end: its place in the batch, what it
    generated, and what waits to be sent."""

    request: EngineRequest
    detok: IncrementalDetokenizer
    stops: StopMatcher
    generator: torch.Generator | None
    matcher: Any  # its grammar's matcher (response_format), or None
    capacity: int  # KV columns of its slot (see kv_slots)
    slot: int = -1
    length: int = 0  # tokens in its KV cache
    generated_ids: list[int] = field(default_factory=list)
    prefilled: bool = False  # its prompt tokens were counted
    strikes: int = 0  # failed steps it was part of
    alone: bool = False  # prefill it in a group of its own (its group failed once)
    pending_ids: list[int] = field(default_factory=list)
    pending_projections: list[float] = field(default_factory=list)
    pending_logprobs: list[Logprob] = field(default_factory=list)
    prompt_logprobs: list[Logprob | None] | None = None  # filled by the prefill when asked for
    prompt_projections: list[float] | None = None  # filled at the end of its prefill when asked for
    first_delta_sent: bool = False  # the prompt's logprobs and projections go out with its first delta
    prompt_logprobs_from: EngineRequest | None = None  # the choice whose prompt logprobs this one shares
    # Index of its first generated token computed capped (None: none yet). 0: capped from the prompt
    # on (it asked for capping, or a gated request's prompt had drifted, which is then prefilled
    # again capped); k > 0: a gated request whose detector tripped at its k-th token (--drift-action cap).
    capping_from: int | None = None
    gate_watch: DetectorState | None = None  # a gated request's token detector
    trip: Trip | None = None  # where its gate tripped
    trip_sent: bool = False  # the trip went out in a delta

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def generated(self) -> int:
        return len(self.generated_ids)

    @property
    def capping_on(self) -> bool:
        """Whether its next forward is capped."""
        return self.capping_from is not None

    @property
    def capped_by_gate(self) -> bool:
        """Capped because its gate tripped: at the axis's gated thresholds, where it has them."""
        return self.trip is not None and self.capping_on

    @property
    def gate_open(self) -> bool:
        """A gated request whose gate has not tripped yet (it watches the prompt, then each token)."""
        return self.params.gate is not None and self.trip is None

    def cap_start(self) -> int | None:
        """The first position of its context that a (re-)prefill caps: the whole prompt when capped
        from the prompt on, else the position whose forward made its first capped token."""
        if self.capping_from is None:
            return None
        return 0 if self.capping_from == 0 else len(self.prompt_ids) - 1 + self.capping_from

    def context_ids(self) -> list[int]:
        """What a (re-)prefill feeds the model: the prompt and every token generated so far."""
        return self.request.prompt_ids + self.generated_ids


class EngineRequest(Request):
    """The seam's request handle, with the engine's state of it (set in ``Engine.submit_all``)."""

    row: Row
