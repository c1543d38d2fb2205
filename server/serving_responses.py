"""POST /v1/responses: OpenAI's Responses API over the chat machinery.

A Responses request becomes a chat completion request (``ResponsesRequest.chat_request``), so its
prompt, sampling, tool calls, capping and checks are the chat endpoint's; this module gives the
output the Responses shape: output items (a message with ``output_text``, ``function_call`` items),
and, streamed, the typed events (``response.created``, ``response.output_text.delta``, ...,
``response.completed``).

``previous_response_id`` continues a stored conversation, and ``GET`` / ``DELETE
/v1/responses/{id}`` read and delete a stored response: responses are kept in memory (``store``, on
by default as OpenAI's), the oldest dropped beyond ``STORE_CHARS`` of text, each readable only with
the API key that made it (``auth.key_owner``). They live in one server process: behind several
replicas a continuation must reach the same one, or it gets a 404.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sse_starlette import EventSourceResponse

from axiscap.steering.gate import Trip

from .auth import key_owner
from .engines import Request
from .protocol import APIError, ChatCompletionRequest, ResponsesRequest, Usage, new_id, now, validation_message
from .request_id import request_id
from .serving_chat import ChatShape, OpenAIServingChat
from .serving_engine import END_ERRORS, ChoiceText, collect
from .tool_calling import Call

STORE_CHARS = 32 * 1024 * 1024  # text kept for previous_response_id and GET, all stored responses together


@dataclass
class _Stored:
    owner: str
    messages: list[dict]  # the conversation up to and with the answer, for previous_response_id
    response: dict[str, Any]  # the response object, for GET
    size: int


class ResponseStore:
    """Responses by id (the response and its conversation), least recent dropped first."""

    def __init__(self, max_chars: int = STORE_CHARS):
        self.max_chars, self.chars = max_chars, 0
        self._entries: OrderedDict[str, _Stored] = OrderedDict()

    def messages(self, response_id: str, owner: str) -> list[dict]:
        """The conversation a continuation (previous_response_id) builds on."""
        entry = self._entry(response_id, owner, f"Previous response with id '{response_id}' not found.",
                            "previous_response_id", "previous_response_not_found")
        return [dict(m) for m in entry.messages]

    def response(self, response_id: str, owner: str) -> dict[str, Any]:
        return self._entry(response_id, owner, f"Response with id '{response_id}' not found.").response

    def delete(self, response_id: str, owner: str) -> None:
        self.chars -= self._entry(response_id, owner, f"Response with id '{response_id}' not found.").size
        del self._entries[response_id]

    def put(self, response_id: str, owner: str, messages: list[dict], response: dict[str, Any]) -> None:
        size = len(json.dumps(messages)) + len(json.dumps(response))
        if size > self.max_chars:
            return
        self._entries[response_id] = _Stored(owner, messages, response, size)
        self.chars += size
        while self.chars > self.max_chars:
            _, dropped = self._entries.popitem(last=False)
            self.chars -= dropped.size

    def _entry(self, response_id: str, owner: str, message: str, param: str | None = None,
               code: str = "not_found") -> _Stored:
        entry = self._entries.get(response_id)
        if entry is None or entry.owner != owner:  # another key's response does not exist for this one
            raise APIError(404, message, param=param, code=code)
        self._entries.move_to_end(response_id)
        return entry


class OpenAIServingResponses(OpenAIServingChat):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.store = ResponseStore()

    def retrieve(self, response_id: str, http: HTTPRequest) -> dict[str, Any]:
        return self.store.response(response_id, key_owner(http))

    def delete(self, response_id: str, http: HTTPRequest) -> dict[str, Any]:
        self.store.delete(response_id, key_owner(http))
        return {"id": response_id, "object": "response", "deleted": True}

    async def create(self, body: ResponsesRequest, http: HTTPRequest):
        owner = key_owner(http)
        history = self.store.messages(body.previous_response_id, owner) if body.previous_response_id else []
        try:
            chat = body.chat_request(history)
        except ValidationError as exc:  # what the chat request refuses (tool_choice without tools, ...)
            message, param = validation_message(exc.errors())
            raise APIError(400, message, param=param) from None
        prompt = await self.prompt(chat)
        shape = ChatShape(self, chat, prompt)
        shape.request_id = request_id(http)
        try:
            (request,) = await self.start(shape)
        except APIError as exc:
            exc.param = body.param_for(exc.param)  # named as this request names it
            raise
        answer = _Answer(self, body, shape, request, owner)
        if body.stream:
            return EventSourceResponse(answer.events(), ping=15)
        outs = await collect([request], http)
        if isinstance(outs, JSONResponse):
            return outs
        out = outs[0]
        content, calls = shape.split(out.text)
        answer.projections, answer.capping_from, answer.drift = out.projections, out.capping_from, out.drift
        if calls:  # what surrounds the calls, as a message of its own
            content = content.strip()
        return JSONResponse(answer.finish(content, calls, out.finish_reason, len(out.token_ids)))


class _Answer:
    """One response being made: its id, its output items, and the conversation it stores."""

    def __init__(self, serving: OpenAIServingResponses, body: ResponsesRequest, shape: ChatShape, request: Request,
                 owner: str):
        self.serving, self.body, self.shape, self.request, self.owner = serving, body, shape, request, owner
        self.chat: ChatCompletionRequest = shape.body
        self.n_prompt = len(shape.prompt_ids)
        self.id, self.created = new_id("resp"), now()
        self.capping = request.params.capping_mode
        self.capping_from: int | None = None  # gated: the first token generated capped
        self.drift: Trip | None = None  # gated: where its gate tripped
        self.projections: list[float | None] = []
        self._seq = 0

    def response(self, status: str, output: list[dict], usage: Usage | None = None,
                 finish_reason: str | None = None) -> dict[str, Any]:
        body = self.body
        fields = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.serving.served.name, "output": output,
            "usage": None if usage is None else {
                "input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.total_tokens},
            "incomplete_details": {"reason": "max_output_tokens"} if finish_reason == "length" else None,
            "error": None, "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature, "top_p": body.top_p, "parallel_tool_calls": body.parallel_tool_calls,
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "tool_choice": body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump")
            else (body.tool_choice or "auto"),
            "text": {"format": body.text.format.model_dump(by_alias=True, exclude_none=True)}
            if body.text is not None and body.text.format is not None else {"format": {"type": "text"}},
            "previous_response_id": body.previous_response_id, "store": body.store, "metadata": {},
            "capping": self.capping,
        }
        if body.capping is not None and body.capping != self.capping:
            fields["capping_overridden"] = True
        if self.capping_from is not None:
            fields["capping_from"] = self.capping_from
        if status != "in_progress" and (drift := self.shape.drift_field(0, self.drift, True)) is not None:
            fields["drift"] = drift
        if body.return_projections:
            fields["axis_projections"] = self.projections
        return fields

    def finish(self, content: str, calls: list[Call], finish_reason: str, n_generated: int,
               items: list[dict] | None = None) -> dict[str, Any]:
        """The final response (and the conversation stored for a continuation)."""
        if items is None:
            items = ([_message(new_id("msg"), content, "completed")] if content or not calls else []) + \
                    [_function_call(new_id("fc"), Call.new_id(), c.name, c.arguments, "completed") for c in calls]
        status = "incomplete" if finish_reason == "length" else "completed"
        response = self.response(status, items, Usage.of(self.n_prompt, n_generated), finish_reason)
        if self.body.store:
            said = [{"role": "assistant", "content": content or None,
                     **({"tool_calls": [{"id": i["call_id"], "type": "function",
                                         "function": {"name": i["name"], "arguments": i["arguments"]}}
                                        for i in items if i["type"] == "function_call"]} if calls else {})}]
            asked = [m.model_dump(exclude_none=True) for m in self.chat.messages]
            # This request's instructions are its own: a continuation brings its own, as OpenAI's does.
            messages = (asked[1:] if self.body.instructions else asked) + said
            self.serving.store.put(self.id, self.owner, messages, response)
        return response

    def _event(self, kind: str, **fields) -> dict[str, str]:
        self._seq += 1
        return {"event": kind, "data": json.dumps({"type": kind, "sequence_number": self._seq - 1, **fields})}

    async def events(self) -> AsyncIterator[dict[str, str]]:
        """Responses' typed events; the text streams as it comes, a call's arguments too (as chat's)."""
        shape, items, n_generated = self.shape, [], 0
        message: dict | None = None  # the open message item
        call: dict | None = None  # the open function_call item
        yield self._event("response.created", response=self.response("in_progress", []))
        yield self._event("response.in_progress", response=self.response("in_progress", []))
        try:
            first = True
            async for delta in self.request.deltas():
                if delta.finish_reason in END_ERRORS:
                    message_text, kind, _ = END_ERRORS[delta.finish_reason]
                    failed = self.response("failed", items)
                    failed["error"] = {"code": kind, "message": message_text}
                    yield self._event("response.failed", response=failed)
                    return
                n_generated += len(delta.token_ids)
                self.projections += delta.projections
                if delta.capping_from is not None:
                    self.capping_from = delta.capping_from
                if delta.drift is not None:
                    self.drift = delta.drift
                out = ChoiceText(0)
                out.add(delta)
                chunk = shape.choice(out, first, streaming=True)
                first = False
                extra = {"axis_projections": delta.projections} if self.body.return_projections else {}
                if chunk.delta.content:
                    if message is None:
                        message = _message(new_id("msg"), "", "in_progress")
                        items.append(message)
                        yield self._event("response.output_item.added", output_index=len(items) - 1, item=message)
                        yield self._event("response.content_part.added", item_id=message["id"],
                                          output_index=len(items) - 1, content_index=0, part=_text_part(""))
                    message["content"][0]["text"] += chunk.delta.content
                    yield self._event("response.output_text.delta", item_id=message["id"],
                                      output_index=items.index(message), content_index=0,
                                      delta=chunk.delta.content, logprobs=[], **extra)
                for tool_call in chunk.delta.tool_calls or []:
                    if tool_call.id is not None:  # a new call: what was open is done
                        async for event in self._close(items, message, call):
                            yield event
                        message = None
                        call = _function_call(new_id("fc"), tool_call.id, tool_call.function.name, "", "in_progress")
                        items.append(call)
                        yield self._event("response.output_item.added", output_index=len(items) - 1, item=call)
                    if tool_call.function.arguments:
                        call["arguments"] += tool_call.function.arguments
                        yield self._event("response.function_call_arguments.delta", item_id=call["id"],
                                          output_index=items.index(call), delta=tool_call.function.arguments)
                if chunk.finish_reason is not None:
                    if not items:  # nothing was said: an empty message, as the whole response has
                        message = _message(new_id("msg"), "", "in_progress")
                        items.append(message)
                        yield self._event("response.output_item.added", output_index=0, item=message)
                        yield self._event("response.content_part.added", item_id=message["id"], output_index=0,
                                          content_index=0, part=_text_part(""))
                    async for event in self._close(items, message, call):
                        yield event
                    content = "".join(i["content"][0]["text"] for i in items if i["type"] == "message")
                    calls = [Call(i["name"], i["arguments"]) for i in items if i["type"] == "function_call"]
                    final = self.finish(content, calls, delta.finish_reason, n_generated, items)
                    yield self._event("response.completed" if final["status"] == "completed" else
                                      "response.incomplete", response=final)
        finally:
            self.request.cancel()  # the client may have gone: the engine frees the slot next step

    async def _close(self, items: list[dict], message: dict | None, call: dict | None) -> AsyncIterator[dict]:
        if message is not None and message["status"] == "in_progress":
            index, text = items.index(message), message["content"][0]["text"]
            message["status"] = "completed"
            yield self._event("response.output_text.done", item_id=message["id"], output_index=index,
                              content_index=0, text=text, logprobs=[])
            yield self._event("response.content_part.done", item_id=message["id"], output_index=index,
                              content_index=0, part=_text_part(text))
            yield self._event("response.output_item.done", output_index=index, item=message)
        if call is not None and call["status"] == "in_progress":
            index = items.index(call)
            call["status"] = "completed"
            yield self._event("response.function_call_arguments.done", item_id=call["id"], output_index=index,
                              arguments=call["arguments"])
            yield self._event("response.output_item.done", output_index=index, item=call)


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": []}


def _message(item_id: str, text: str, status: str) -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [_text_part(text)]}


def _function_call(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}
