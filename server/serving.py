"""Serving logic behind the routes: prompts, budgets, engine submission and response shapes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from .chat_template import ChatTemplateError, chat_prompt_ids
from .config import Settings
from .engine import DoesNotFit, Engine, QueueFull, Request
from .model_loading import LoadedModel
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, _GenerationBody, error_body,
                       model_card, new_id, now, usage)
from .sampling import SamplingParams


@dataclass
class _Shape:
    """What differs between /v1/chat/completions and /v1/completions."""

    id_prefix: str
    chunk_object: str
    full_object: str
    chat: bool

    def stream_choice(self, text: str, first: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}

    def full_choice(self, text: str) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": None}


CHAT = _Shape("chatcmpl", "chat.completion.chunk", "chat.completion", chat=True)
COMPLETION = _Shape("cmpl", "text_completion", "text_completion", chat=False)


_END_ERRORS = {
    "error": ("generation failed on the server", "server_error", 500),
    "timeout": ("the request took longer than this server allows", "timeout_error", 504),
}


class OpenAIServing:
    def __init__(self, engine: Engine, loaded: LoadedModel, settings: Settings):
        self.engine, self.loaded, self.settings = engine, loaded, settings
        self.tokenizer = loaded.tokenizer
        self.created = now()
        self.max_model_len = min(settings.max_model_len or loaded.context_length, loaded.context_length)

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [model_card(self.loaded.name, self.created)]}

    # --- prompts ----------------------------------------------------------------------------

    def chat_prompt_ids(self, body: ChatCompletionRequest) -> list[int]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            return chat_prompt_ids(self.tokenizer, messages)
        except ChatTemplateError as exc:
            raise APIError(400, str(exc), param="messages") from None

    def completion_prompt_ids(self, body: CompletionRequest) -> list[int]:
        if isinstance(body.prompt, list):
            vocab = self.loaded.vocab_size  # the embedding's rows: any other id cannot be looked up
            if any(not 0 <= t < vocab for t in body.prompt):
                raise APIError(400, f"prompt token ids must lie in 0..{vocab - 1}", param="prompt")
            return list(body.prompt)
        return self.tokenizer(body.prompt, add_special_tokens=True)["input_ids"]

    # --- submission ---------------------------------------------------------------------------

    def capping_for(self, body: _GenerationBody) -> bool:
        """The operator's policy decides; under ``client`` the request's field, then the default."""
        policy = self.settings.capping_policy
        if policy != "client":
            return policy == "always"
        return self.settings.capping_default if body.capping is None else body.capping

    def submit(self, body: _GenerationBody, prompt_ids: list[int]) -> Request:
        if body.model != self.loaded.name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves "
                                f"'{self.loaded.name}'", param="model", code="model_not_found")
        if body.return_projections and not self.settings.allow_projections:
            raise APIError(403, "this server does not return axis projections", type="permission_error",
                           param="return_projections", code="projections_disabled")
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
        params = SamplingParams(
            max_tokens=requested if requested is not None else min(room, self.settings.default_max_tokens),
            temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=tuple(body.stop or ()),
            capping=self.capping_for(body),
        )
        try:
            return self.engine.submit(prompt_ids, params, timeout=self.settings.request_timeout)
        except QueueFull:
            raise APIError(429, "the server is at capacity; retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except DoesNotFit as exc:
            raise APIError(400, str(exc), param="max_tokens", code="context_length_exceeded") from None
        except ValueError as exc:  # per-request setup refused it (e.g. a seed torch cannot take)
            raise APIError(400, f"invalid request: {exc}") from None

    # --- responses ----------------------------------------------------------------------------

    async def respond(self, shape: _Shape, body: _GenerationBody, prompt_ids: list[int], http: HTTPRequest):
        request = self.submit(body, prompt_ids)
        if body.stream:
            return EventSourceResponse(self._stream(shape, body, request, len(prompt_ids)), ping=15)
        return await self._full(shape, body, request, len(prompt_ids), http)

    def _envelope(self, shape: _Shape, body: _GenerationBody, rid: str, created: int, capping: bool,
                  streaming: bool) -> dict[str, Any]:
        envelope = {"id": rid, "object": shape.chunk_object if streaming else shape.full_object,
                    "created": created, "model": self.loaded.name, "capping": capping}
        if body.capping is not None and body.capping != capping:  # the operator's policy overrode it
            envelope["capping_overridden"] = True
        return envelope

    async def _stream(self, shape: _Shape, body: _GenerationBody, request: Request,
                      n_prompt: int) -> AsyncIterator[str]:
        rid, created = new_id(shape.id_prefix), now()
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        n_generated, first = 0, True
        try:
            async for delta in request.deltas():
                if delta.finish_reason in _END_ERRORS:
                    message, kind, _ = _END_ERRORS[delta.finish_reason]
                    yield json.dumps(error_body(message, kind))
                    break  # still ends with [DONE], so clients waiting for it stop reading
                n_generated += len(delta.token_ids)
                chunk = self._envelope(shape, body, rid, created, request.params.capping, streaming=True)
                choice = shape.stream_choice(delta.text, first)
                if delta.finish_reason is not None:
                    choice["finish_reason"] = delta.finish_reason
                if body.return_projections:
                    choice["axis_projections"] = delta.projections
                chunk["choices"] = [choice]
                if include_usage:
                    chunk["usage"] = None
                first = False
                yield json.dumps(chunk)
            else:  # the stream ended normally, not at an error
                if include_usage:
                    chunk = self._envelope(shape, body, rid, created, request.params.capping, streaming=True)
                    chunk.update(choices=[], usage=usage(n_prompt, n_generated))
                    yield json.dumps(chunk)
            yield "[DONE]"
        finally:
            # Runs when the client goes away mid-stream too: the engine frees the slot next step.
            request.cancel()

    async def _full(self, shape: _Shape, body: _GenerationBody, request: Request, n_prompt: int,
                    http: HTTPRequest) -> JSONResponse:
        collected = asyncio.ensure_future(_collect(request))
        gone = asyncio.ensure_future(_wait_for_disconnect(http))
        try:
            await asyncio.wait({collected, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collected.done():
                request.cancel()
                collected.cancel()
        if not collected.done() or collected.cancelled():
            return JSONResponse(error_body("client closed the request", "invalid_request_error"), status_code=499)
        text, token_ids, projections, finish = collected.result()
        if finish in _END_ERRORS:
            message, kind, status = _END_ERRORS[finish]
            raise APIError(status, message, type=kind)
        result = self._envelope(shape, body, new_id(shape.id_prefix), now(), request.params.capping,
                                streaming=False)
        choice = shape.full_choice(text)
        choice["finish_reason"] = finish
        if body.return_projections:
            choice["axis_projections"] = projections
        result.update(choices=[choice], usage=usage(n_prompt, len(token_ids)))
        return JSONResponse(result)


async def _collect(request: Request) -> tuple[str, list[int], list[float], str | None]:
    text, ids, projections, finish = [], [], [], None
    async for delta in request.deltas():
        text.append(delta.text)
        ids.extend(delta.token_ids)
        projections.extend(delta.projections)
        finish = delta.finish_reason
    return "".join(text), ids, projections, finish


async def _wait_for_disconnect(http: HTTPRequest) -> None:
    # The body is already read, so the next message is the disconnect.
    while (await http.receive())["type"] != "http.disconnect":
        pass

