"""What every OpenAI endpoint family shares: the model's tokenizer and limits, request checks, engine
submission, and streamed or whole responses. One subclass per family beside it (``serving_chat``,
``serving_completion``, ``serving_tokenization``, ``serving_models``), as vLLM lays its serving out."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from axiscap.steering import AssistantAxis
from axiscap.steering.gate import GATED_ROLES, CapGate, Trip, gate_for

from .chat_template import ChatPrompt, ChatTemplateError, MessageSpan, render_chat
from .config import Settings
from .metrics import ServingMetrics
from .engines import (Delta, DoesNotFit, EngineClient, GrammarError, Logprob, QueueFull, Request,
                      SamplingParams, ServedModel)
from .protocol import (APIError, ChatMessage, CompletionRequest, Usage, _GenerationBody, error_body, new_id, now)
from .request_id import request_id
from .tool_calling import render_messages, template_knows_tools

# One line per tripped gate, with the request id and nothing of its content.
drift_log = logging.getLogger("axiscap.drift")

END_ERRORS = {
    "error": ("generation failed on the server", "server_error", 500),
    "timeout": ("the request took longer than this server allows", "timeout_error", 504),
}


@dataclass
class ChoiceText:
    """One choice's output so far: what a non-stream response holds, or one stream chunk's share."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    projections: list[float | None] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    prompt_logprobs: list[Logprob | None] | None = None
    prompt_projections: list[float | None] | None = None
    capping_from: int | None = None  # a gated request's first capped token, in the delta that holds it
    drift: Trip | None = None  # a gated request's trip, in the delta after it
    finish_reason: str | None = None

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.projections += delta.projections
        self.logprobs += delta.logprobs or []
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.prompt_projections is not None:
            self.prompt_projections = delta.prompt_projections
        if delta.capping_from is not None:
            self.capping_from = delta.capping_from
        if delta.drift is not None:
            self.drift = delta.drift
        self.finish_reason = delta.finish_reason


class Shape:
    """What differs between /v1/chat/completions and /v1/completions: the response types."""

    id_prefix = ""

    def __init__(self, serving: OpenAIServing, body: _GenerationBody, prompt_ids: list[int]):
        self.serving, self.body, self.prompt_ids = serving, body, prompt_ids
        self.spans: list[MessageSpan] | None = None  # where each message lies (chat prompts)
        self.gated = False  # set once its requests run gated: each choice then reports its gate's verdict
        self._tripped: set[int] = set()  # choices whose trip went out
        self.request_id: str | None = None  # the HTTP request's (X-Request-Id), for log lines

    def choice(self, out: ChoiceText, first: bool, streaming: bool):
        raise NotImplementedError

    def response(self, streaming: bool, **fields):
        raise NotImplementedError

    def _extras(self, out: ChoiceText) -> dict[str, Any]:
        extras = {"axis_projections": out.projections} if self.body.return_projections else {}
        if out.capping_from is not None:  # a gated request: where capping began (absent: it never did)
            extras["capping_from"] = out.capping_from
        drift = self.drift_field(out.index, out.drift, out.finish_reason is not None)
        if drift is not None:
            extras["drift"] = drift
        return extras

    def drift_field(self, index: int, trip: Trip | None, finished: bool) -> dict[str, Any] | None:
        """A gated choice's verdict: its trip (logged, once, as it goes out), or at its end that it never
        tripped; None where there is nothing to say (not gated, or a chunk in between)."""
        if not self.gated:
            return None
        if trip is not None:
            if index not in self._tripped:
                self._tripped.add(index)
                drift_log.log(logging.INFO if trip.action == "cap" else logging.WARNING,
                              "gate tripped: request_id=%s choice=%d source=%s at=%d statistic=%.3f action=%s",
                              self.request_id, index, trip.source, trip.at, trip.statistic, trip.action)
            return self.serving.drift_report(trip)
        return {"tripped": False} if finished and index not in self._tripped else None

    def envelope_extras(self) -> dict[str, Any]:
        """Top-level fields a response or chunk adds (once the choices so far are built)."""
        return {}


class OpenAIServing:
    def __init__(self, engine: EngineClient, served: ServedModel, settings: Settings, axis: AssistantAxis,
                 metrics: ServingMetrics):
        self.engine, self.served, self.settings, self.axis, self.metrics = engine, served, settings, axis, metrics
        self.tokenizer = served.tokenizer
        self.created = now()
        self.max_model_len = min(settings.max_model_len or served.context_length, served.context_length)
        # A token's own text, as logprobs name it (vLLM decodes each id alone too).
        self.token_text = functools.lru_cache(maxsize=1 << 16)(lambda i: self.tokenizer.decode([i]))

    # --- checks and prompts ------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served.name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.served.name}'",
                           param="model", code="model_not_found")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.served.vocab_size  # the embedding's rows: any other id cannot be looked up
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"token ids must lie in 0..{vocab - 1}", param=param)

    def chat_prompt_ids(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        return self.chat_prompt(messages, add_generation_prompt, spans=False).ids

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None, spans: bool = True) -> ChatPrompt:
        """The chat template's rendering of ``messages``, with ``tools`` where the request offers them,
        and where each message's tokens lie."""
        openai_messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(),
                            **({"tool_calls": [c.model_dump() for c in m.tool_calls]} if m.tool_calls else {}),
                            **({"tool_call_id": m.tool_call_id} if m.tool_call_id else {})} for m in messages]
        native = template_knows_tools(self.tokenizer.chat_template)
        rendered = render_messages(openai_messages, tools, native)
        try:
            return render_chat(self.tokenizer, rendered, add_generation_prompt, tools if native else None, spans)
        except ChatTemplateError as exc:
            raise APIError(400, str(exc), param="messages") from None

    # --- submission ---------------------------------------------------------------------------

    def capping_for(self, body: _GenerationBody) -> bool | Literal["auto"]:
        """The operator's policy decides; under ``client`` the request's field, then the default."""
        policy = self.settings.capping_policy
        if policy == "gated":
            return "auto"
        if policy != "client":
            return policy == "always"
        return self.settings.capping_default if body.capping is None else body.capping

    def gate_for(self, spans: list[MessageSpan] | None) -> CapGate:
        """A gated request's gate: the prompt's system and assistant messages, and this axis's thresholds."""
        if not self.engine.gated_capping:
            raise APIError(400, "this server's engine cannot gate capping ('auto'); send true or false",
                           param="capping")
        watched = tuple((s.start, s.end) for s in spans or () if s.role in GATED_ROLES)
        return gate_for(self.axis, watched, self.settings.drift_action)

    def sampling_params(self, body: _GenerationBody, prompt_ids: list[int],
                        spans: list[MessageSpan] | None = None) -> SamplingParams:
        """Check the request against this server and model; the per-choice parameters."""
        self.check_model(body.model)
        capping = self.capping_for(body)
        gate = self.gate_for(spans) if capping == "auto" else None
        if body.return_projections and not self.settings.allow_projections:
            raise APIError(403, "this server does not return axis projections", type="permission_error",
                           param="return_projections", code="projections_disabled")
        if body.n > self.settings.max_n:
            raise APIError(400, f"n is {body.n}; this server allows at most {self.settings.max_n}", param="n")
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        limit = self.max_model_len
        room = limit - len(prompt_ids)
        if room < 1:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this server's context window is "
                                f"{limit}", param="messages", code="context_length_exceeded")
        requested = body.requested_max_tokens()
        if requested is not None and requested > room:
            raise APIError(400, f"max_tokens is {requested}, but the prompt ({len(prompt_ids)} tokens) leaves "
                                f"room for {room} in the {limit}-token context window",
                           param="max_tokens", code="context_length_exceeded")
        max_tokens = requested if requested is not None else min(room, self.settings.default_max_tokens)
        if body.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({body.min_tokens}) is above max_tokens ({max_tokens})",
                           param="min_tokens")
        bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
        self.check_token_ids(list(bias), "logit_bias")
        echo_logprobs = isinstance(body, CompletionRequest) and body.echo and body.logprobs is not None
        if echo_logprobs and body.n * len(prompt_ids) > self.settings.max_prompt_logprobs_tokens:
            raise APIError(400, f"echo with logprobs on {body.n} choice(s) of a {len(prompt_ids)}-token prompt asks "
                                f"for {body.n * len(prompt_ids)} prompt logprobs; this server gives at most "
                                f"{self.settings.max_prompt_logprobs_tokens} per request "
                                f"(--max-prompt-logprobs-tokens)", param="logprobs")
        return SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
            stop=tuple(body.stop or ()), capping=capping is True, gate=gate,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty, logit_bias=tuple(bias.items()), min_tokens=body.min_tokens,
            ignore_eos=body.ignore_eos, logprobs=body.generated_logprobs(),
            prompt_logprobs=body.logprobs if echo_logprobs else None, response_format=_response_format(body))

    async def submit(self, body: _GenerationBody, prompt_ids: list[int], params: SamplingParams) -> list[Request]:
        """One engine request per choice; a seeded request's choices take seed, seed + 1, ... (as vLLM)."""
        per_choice = [params if params.seed is None or i == 0 else
                      dataclasses.replace(params, seed=(params.seed + i + 2**63) % 2**64 - 2**63)  # stays int64
                      for i in range(body.n)]
        try:
            return await self.engine.submit_all(prompt_ids, per_choice, timeout=self.settings.request_timeout)
        except QueueFull:
            raise APIError(429, "the server is at capacity; retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except DoesNotFit as exc:
            raise APIError(400, str(exc), param="max_tokens", code="context_length_exceeded") from None
        except GrammarError as exc:
            raise APIError(400, str(exc), param="response_format") from None
        except ValueError as exc:  # per-request setup refused it (e.g. a seed torch cannot take)
            raise APIError(400, f"invalid request: {exc}") from None

    # --- responses ----------------------------------------------------------------------------

    async def start(self, shape: Shape) -> list[Request]:
        """The shape's request in the engine: its sampling parameters, one engine request per choice."""
        params = self.sampling_params(shape.body, shape.prompt_ids, shape.spans)
        shape.gated = params.gate is not None
        return await self.submit(shape.body, shape.prompt_ids, params)

    def drift_report(self, trip: Trip) -> dict[str, Any]:
        """A trip as a response says it: its statistic is a projection, withheld where projections are."""
        report = trip.as_dict()
        if not self.settings.allow_projections:
            del report["statistic"]
        return report

    async def respond(self, shape: Shape, http: HTTPRequest):
        shape.request_id = request_id(http)
        requests = await self.start(shape)
        if shape.body.stream:
            return EventSourceResponse(self._stream(shape, requests), ping=15)
        return await self._full(shape, requests, http)

    def _envelope(self, shape: Shape, rid: str, created: int, capping: bool | Literal["auto"]) -> dict[str, Any]:
        envelope = {"id": rid, "created": created, "model": self.served.name, "capping": capping}
        if shape.body.capping is not None and shape.body.capping != capping:  # the operator's policy overrode it
            envelope["capping_overridden"] = True
        return {**envelope, **shape.envelope_extras()}

    async def _stream(self, shape: Shape, requests: list[Request]) -> AsyncIterator[str]:
        body = shape.body
        rid, created, capping = new_id(shape.id_prefix), now(), requests[0].params.capping_mode
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        n_generated, started = 0, set()
        try:
            async for index, delta in _merged(requests):
                if delta.finish_reason in END_ERRORS:
                    message, kind, _ = END_ERRORS[delta.finish_reason]
                    yield json.dumps(error_body(message, kind))
                    break  # still ends with [DONE], so clients waiting for it stop reading
                n_generated += len(delta.token_ids)
                out = ChoiceText(index)
                out.add(delta)
                choice = shape.choice(out, index not in started, streaming=True)
                started.add(index)
                extra = {"usage": None} if include_usage else {}
                chunk = shape.response(True, **self._envelope(shape, rid, created, capping), choices=[choice], **extra)
                yield chunk.model_dump_json()
            else:  # the stream ended normally, not at an error
                if include_usage:
                    chunk = shape.response(True, **self._envelope(shape, rid, created, capping), choices=[],
                                           usage=Usage.of(len(shape.prompt_ids), n_generated))
                    yield chunk.model_dump_json()
            yield "[DONE]"
        finally:
            # Runs when the client goes away mid-stream too: the engine frees the slots next step.
            for request in requests:
                request.cancel()

    async def _full(self, shape: Shape, requests: list[Request], http: HTTPRequest) -> JSONResponse:
        outs = await collect(requests, http)
        if isinstance(outs, JSONResponse):
            return outs
        choices = [shape.choice(out, True, streaming=False) for out in outs]
        envelope = self._envelope(shape, new_id(shape.id_prefix), now(), requests[0].params.capping_mode)
        result = shape.response(False, **envelope, choices=choices,
                                usage=Usage.of(len(shape.prompt_ids), sum(len(o.token_ids) for o in outs)))
        return JSONResponse(result.model_dump(mode="json"))


def _response_format(body: _GenerationBody) -> tuple[str, str | None] | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    return fmt.type, json.dumps(fmt.json_schema.schema_) if fmt.json_schema is not None else None


async def _merged(requests: list[Request]) -> AsyncIterator[tuple[int, Delta]]:
    """The deltas of a request's choices as they come, each with its choice index."""
    if len(requests) == 1:
        async for delta in requests[0].deltas():
            yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()

    async def pump(index: int, request: Request) -> None:
        async for delta in request.deltas():
            queue.put_nowait((index, delta))

    pumps = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(requests)]
    try:
        running = len(requests)
        while running:
            index, delta = await queue.get()
            running -= delta.finish_reason is not None
            yield index, delta
    finally:
        for task in pumps:
            task.cancel()


async def collect(requests: list[Request], http: HTTPRequest) -> list[ChoiceText] | JSONResponse:
    """Every choice's whole output; or, where the client left first or the generation failed, the error
    response (the requests are cancelled once the client has gone)."""
    collected = asyncio.ensure_future(asyncio.gather(*(_collect(i, r) for i, r in enumerate(requests))))
    gone = asyncio.ensure_future(_wait_for_disconnect(http))
    try:
        await asyncio.wait({collected, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collected.done():
            for request in requests:
                request.cancel()
            collected.cancel()
            # Retrieved, so asyncio does not log the cancelled gather as an error nobody saw.
            collected.add_done_callback(lambda f: f.cancelled() or f.exception())
    if not collected.done() or collected.cancelled():
        return JSONResponse(error_body("client closed the request", "invalid_request_error"), status_code=499)
    outs: list[ChoiceText] = collected.result()
    for out in outs:
        if out.finish_reason in END_ERRORS:
            # Not an APIError: the engine counted this request by its finish reason already, and a
            # request ends in one counter, never also in the rejected ones.
            message, kind, status = END_ERRORS[out.finish_reason]
            return JSONResponse(error_body(message, kind), status_code=status)
    return outs


async def _collect(index: int, request: Request) -> ChoiceText:
    out = ChoiceText(index)
    async for delta in request.deltas():
        out.add(delta)
    return out


async def _wait_for_disconnect(http: HTTPRequest) -> None:
    # The body is already read, so the next message is the disconnect.
    while (await http.receive())["type"] != "http.disconnect":
        pass
