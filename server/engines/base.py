"""The engine seam: what the HTTP layer hands an engine and gets back, whichever engine runs.

An engine takes prompt token ids with per-request ``SamplingParams`` (sampling, the capping switch,
logprobs, structured output), and answers with a ``Request`` handle whose ``deltas()`` stream text,
token ids, per-token axis projections and logprobs until a finish reason. ``EngineClient`` is the
interface the routes use; ``hf.engine.Engine`` (transformers: CPU and the embedded model) and
``vllm.engine.VllmEngine`` (vLLM: GPUs, large models) implement it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from transformers import PreTrainedTokenizerBase

from axiscap.steering.gate import CapGate, Trip

if TYPE_CHECKING:
    from .grammar import GrammarCompiler

# Every finish_reason an engine reports; the first three end a completion the client asked for
# (content_filter: a gated request stopped where it drifted, under --drift-action stop).
FINISH_REASONS = ("stop", "length", "content_filter", "cancelled", "timeout", "error")
FINISHED_GENERATING = FINISH_REASONS[:3]
# JSON has no -inf: a token the grammar or min_tokens rules out reports this, as vLLM does.
LOGPROB_FLOOR = -9999.0


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    capping: bool = True  # capped from the first token
    gate: CapGate | None = None  # gated (capping is False): capped from where the gate finds drift
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM's: > 1 divides positive logits of seen tokens, multiplies negative
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False  # end-of-sequence does not end the completion (fixed-length benchmarks)
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and its top k alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token (completions' echo)
    # Each prompt token's monitor projection, in the first delta. "all": every one, even where that
    # costs a prefix-cache hit; "computed": those the prefill computes (cached ones are None).
    prompt_projections: Literal["all", "computed"] | None = None
    response_format: tuple[str, str | None] | None = None  # ("json_object" | "json_schema", schema JSON)

    @property
    def capping_mode(self) -> bool | Literal["auto"]:
        """As responses report it: true, false, or "auto" (gated)."""
        return "auto" if self.gate is not None else self.capping

    @property
    def penalized(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
                or self.min_tokens > 0)


class QueueFull(Exception):
    """The waiting queue is at its bound; the caller should answer 429."""


class DoesNotFit(ValueError):
    """A request that needs more KV cache than the engine will ever have; the caller answers 400."""


def over_request_share(choices: int, prompt_tokens: int, max_tokens: int, needed: int, allowed: int,
                       total: int) -> DoesNotFit:
    """The 400 for one API request that would hold more of the KV cache than --max-request-kv-share allows."""
    return DoesNotFit(f"{choices} choice(s) of {prompt_tokens} prompt tokens and max_tokens {max_tokens} need "
                      f"{needed} KV cache tokens; one request may hold at most {allowed} of this server's {total} "
                      f"(--max-request-kv-share): lower max_tokens or n")


@dataclass
class Logprob:
    """A token's logprob and the top alternatives at its position, as (token id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Delta:
    """What one engine step produced for one request."""

    text: str
    token_ids: list[int]
    projections: list[float | None]  # None where the engine has no projection for a token
    finish_reason: str | None = None  # one of FINISH_REASONS
    logprobs: list[Logprob] | None = None  # one per token id, when the request asked for them
    # In the first delta of a request that asked: one per prompt token (None for the first).
    prompt_logprobs: list[Logprob | None] | None = None
    # In the first delta of a request that asked: each prompt token's monitor projection (None for a
    # token a prefix-cache hit never computed).
    prompt_projections: list[float | None] | None = None
    # A gated request's: in the delta that carries its first capped token, that token's index.
    capping_from: int | None = None
    # A gated request's: in the first delta after its gate tripped, where and why.
    drift: Trip | None = None


class Request:
    """A submitted generation. Iterate ``deltas()`` from the event loop; ``cancel()`` from anywhere."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop,
                 timeout: float | None = None):
        self.prompt_ids = prompt_ids
        self.params = params
        self.arrival = time.monotonic()
        self.deadline = self.arrival + timeout if timeout is not None else None
        self._loop = loop
        self._out: asyncio.Queue[Delta] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._last_token_at: float | None = None
        self._finish_recorded = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def reserved_tokens(self) -> int:
        """KV cache columns this request may come to hold: its prompt and its whole completion."""
        return len(self.prompt_ids) + self.params.max_tokens

    def cancel(self) -> None:
        self._cancelled.set()

    def ended(self, now: float) -> str | None:
        """Why the engine should stop it now: "cancelled", "timeout", or None."""
        if self.cancelled:
            return "cancelled"
        if self.deadline is not None and now >= self.deadline:
            return "timeout"
        return None

    # What a request's deltas mean for the metrics, in one place for every engine (as vLLM's output
    # processor does it), so that each series means the same whatever the backend.

    def record_tokens(self, stats: StepStats, projections: list[float | None], now: float,
                      capped: bool | None = None) -> None:
        """A delta's tokens: time to first token for the first, inter-token latency between deltas
        after it, and each token's projection (None where the engine has none); ``capped``: whether
        they were (default: the request's switch; a gated request's engine says per token)."""
        if not projections:
            return
        if self._last_token_at is None:
            stats.first_token_seconds.append(now - self.arrival)
        else:
            stats.inter_token_seconds.append(now - self._last_token_at)
        self._last_token_at = now
        capped = self.params.capping if capped is None else capped
        stats.tokens.extend((p, capped) for p in projections)

    def record_finish(self, stats: StepStats, reason: str, now: float) -> None:
        """The request's end, counted once whatever reports it: its reason, and the end-to-end latency
        of a request that finished generating (``stop`` or ``length``)."""
        if self._finish_recorded:
            return
        self._finish_recorded = True
        stats.finished.append((reason, now - self.arrival if reason in FINISHED_GENERATING else None))

    def record_trip(self, stats: StepStats, trip: Trip) -> None:
        stats.drift_detections.append((trip.source, trip.action))

    def emit(self, delta: Delta) -> None:
        """Hand a delta to the request's event loop (from the engine's thread)."""
        try:
            self._loop.call_soon_threadsafe(self._out.put_nowait, delta)
        except RuntimeError:  # its event loop is closed: nobody is left to read it
            pass

    async def deltas(self):
        while True:
            delta = await self._out.get()
            yield delta
            if delta.finish_reason is not None:
                return


@dataclass
class StepStats:
    """What an engine did since its last report; its ``StatLogger`` turns that into metrics."""

    waiting: int = 0  # requests queued, after the step
    running: int = 0  # requests in the batch, after the step
    prompt_tokens: int = 0  # prompt tokens of requests whose prefill finished
    first_token_seconds: list[float] = field(default_factory=list)  # arrival to first token
    inter_token_seconds: list[float] = field(default_factory=list)
    tokens: list[tuple[float | None, bool]] = field(default_factory=list)  # per token: (projection, capped)
    cap_hits: list[list[float]] = field(default_factory=list)  # per forward: positions capped, per capped layer
    finished: list[tuple[str, float | None]] = field(default_factory=list)  # (reason, seconds since arrival)
    drift_detections: list[tuple[str, str]] = field(default_factory=list)  # gated requests' trips: (source, action)


class StatLogger(Protocol):
    """Where an engine's statistics go: the one place that feeds Prometheus (``metrics.ServingMetrics``)."""

    def record(self, stats: StepStats) -> None: ...

    def observe_grammar(self, outcome: str, seconds: float | None = None) -> None:
        """A response format's compile (outcome ok, error or timeout, with its seconds) or cache hit
        (outcome cached)."""


class DiscardStats:
    """The StatLogger of an engine that nobody scrapes (the axis tools' offline engines)."""

    def record(self, stats: StepStats) -> None:
        pass

    def observe_grammar(self, outcome: str, seconds: float | None = None) -> None:
        pass


class ServedModel(Protocol):
    """What the HTTP layer needs to know of the model an engine serves."""

    name: str  # the id clients send in "model"
    tokenizer: PreTrainedTokenizerBase
    vocab_size: int  # token ids the model can take
    context_length: int  # prompt + completion tokens one request may hold


class GrammarError(ValueError):
    """A response_format the engine cannot turn into a grammar; the caller answers 400."""


class EngineClient(Protocol):
    """What the HTTP layer needs of an engine."""

    device_error: str | None  # set once the device itself has failed (/health answers 503)
    grammars: GrammarCompiler  # response formats' and tool schemas' policy and compiler (``grammar``)
    gated_capping: bool  # whether it runs SamplingParams.gate (else requests carry none)

    def start(self) -> None: ...

    def stop(self) -> None: ...

    @property
    def healthy(self) -> bool: ...

    async def submit_all(self, prompt_ids: list[int], params: list[SamplingParams],
                         timeout: float | None = None) -> list[Request]:
        """Queue one request per params (the choices of one API request), all or none; raises
        QueueFull, DoesNotFit, GrammarError or another ValueError for a request it refuses.
        Slow setup (compiling a response format) runs off the event loop, so one client's large
        schema never stalls the other streams."""
        ...
