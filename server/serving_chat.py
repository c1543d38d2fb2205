"""/v1/chat/completions: the chat template renders the prompt (with tools, ``tool_calling``); chat-shaped
choices and chunks, tool calls among them."""

from __future__ import annotations

import asyncio
import dataclasses
import json

from fastapi import Request as HTTPRequest

from .engines import GrammarError, Logprob, SamplingParams
from .protocol import (APIError, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                       ChatCompletionRequest, ChatDelta, ChatLogprobs, ChatTokenLogprob, DeltaToolCall,
                       ResponseFunction, ResponseToolCall, TopLogprob)
from .serving_engine import ChoiceText, OpenAIServing, Shape
from .tool_calling import Call, forced_calls, forced_schema, held_from, parse_calls


class ChatShape(Shape):
    id_prefix = "chatcmpl"

    def __init__(self, serving: OpenAIServingChat, body: ChatCompletionRequest, prompt_ids: list[int]):
        super().__init__(serving, body, prompt_ids)
        self.mode, self.named = body.tool_mode()
        self.functions = [t.function.model_dump() for t in body.tools or []]
        self.parser = serving.settings.tool_call_parser
        # Streaming with tools: per choice, the text so far and how much of it went out as content.
        self._text: dict[int, str] = {}
        self._sent: dict[int, int] = {}

    def choice(self, out: ChoiceText, first: bool, streaming: bool):
        logprobs = None
        if self.body.logprobs:
            logprobs = ChatLogprobs(content=[self._token_logprob(lp) for lp in out.logprobs])
        if streaming:
            delta = self._delta(out, first)
            calls = self.mode == "named" or bool(delta.tool_calls)
            return ChatChunkChoice(index=out.index, delta=delta, logprobs=logprobs,
                                   finish_reason=self._finish(out, calls), **self._extras(out))
        content, calls = self._split(out.text)
        message = AssistantMessage(content=content or None if calls else content)
        if calls:
            message.tool_calls = [ResponseToolCall(id=Call.new_id(), type="function",
                                                   function=ResponseFunction(name=c.name, arguments=c.arguments))
                                  for c in calls]
        return ChatChoice(index=out.index, message=message, logprobs=logprobs,
                          finish_reason=self._finish(out, calls), **self._extras(out))

    def _split(self, text: str) -> tuple[str, list[Call]]:
        """A whole output's content and tool calls."""
        if self.mode in ("named", "required"):
            return "", forced_calls(text, self.named)
        if self.mode == "auto":
            return parse_calls(self.parser, text, self.functions)
        return text, []

    @staticmethod
    def _finish(out: ChoiceText, calls) -> str | None:
        """OpenAI's ``tool_calls`` where the output ended in calls; a cut-off one stays ``length``."""
        return "tool_calls" if calls and out.finish_reason == "stop" else out.finish_reason

    def _delta(self, out: ChoiceText, first: bool) -> ChatDelta:
        role = {"role": "assistant"} if first else {}
        if self.mode == "none":
            return ChatDelta(**role, content=out.text) if first or out.text else ChatDelta()
        i = out.index
        text = self._text[i] = self._text.get(i, "") + out.text
        if self.mode == "named":  # the arguments stream as they come, under the call opened first
            opened = {"id": Call.new_id(), "type": "function"} if first else {}
            call = DeltaToolCall(index=0, **opened, function=ResponseFunction(
                **({"name": self.named} if first else {}), arguments=out.text))
            return ChatDelta(**role, tool_calls=[call]) if first or out.text else ChatDelta()
        sent = self._sent.get(i, 0)
        if out.finish_reason is None:  # content goes out up to where a call may begin
            if self.mode == "required":
                return ChatDelta(**role)
            upto = max(sent, held_from(self.parser, text))
            self._sent[i] = upto
            return ChatDelta(**role, content=text[sent:upto]) if first or upto > sent else ChatDelta()
        content, calls = self._split(text)  # the end: what was held back, and the calls
        rest = content[sent:] if self.mode == "auto" else ""
        deltas = [DeltaToolCall(index=k, id=Call.new_id(), type="function",
                                function=ResponseFunction(name=c.name, arguments=c.arguments))
                  for k, c in enumerate(calls)]
        fields = {**role, **({"content": rest} if rest else {}), **({"tool_calls": deltas} if deltas else {})}
        return ChatDelta(**fields)

    def _token_logprob(self, lp: Logprob) -> ChatTokenLogprob:
        token = self.serving.token_text
        top = [TopLogprob(token=token(i), logprob=v, bytes=list(token(i).encode())) for i, v in lp.top]
        return ChatTokenLogprob(token=token(lp.token_id), logprob=lp.logprob, bytes=list(token(lp.token_id).encode()),
                                top_logprobs=top)

    def response(self, streaming: bool, **fields):
        return (ChatCompletionChunk if streaming else ChatCompletion)(**fields)


class OpenAIServingChat(OpenAIServing):
    async def prompt_ids(self, body: ChatCompletionRequest) -> list[int]:
        """The prompt, tools included. Tokenizing runs in a thread (the tokenizer lets go of the GIL): a
        megabyte of prompt takes a second, and on the event loop every stream would stall for it."""
        mode = body.tool_mode()[0]
        if mode == "auto":  # a forced call's schema is compiled with its grammar; here it is only checked
            schema = forced_schema([t.function.model_dump() for t in body.tools], None, True)
            try:
                await asyncio.to_thread(self.engine.grammars.compile, "json_schema", json.dumps(schema))
            except GrammarError as exc:
                raise APIError(400, f"tools: {exc}", param="tools") from None
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if mode != "none" else None
        return await asyncio.to_thread(self.chat_prompt_ids, body.messages, True, tools)

    async def create(self, body: ChatCompletionRequest, http: HTTPRequest):
        prompt_ids = await self.prompt_ids(body)
        try:
            return await self.respond(ChatShape(self, body, prompt_ids), http)
        except APIError as exc:
            if exc.param == "response_format" and body.tool_mode()[0] in ("named", "required"):
                exc.param = "tools"  # the grammar came from a function's parameters
            raise

    def sampling_params(self, body: ChatCompletionRequest, prompt_ids: list[int]) -> SamplingParams:
        params = super().sampling_params(body, prompt_ids)
        mode, named = body.tool_mode()
        if mode in ("named", "required"):  # sampling follows the calls' JSON schema
            schema = forced_schema([t.function.model_dump() for t in body.tools], named, body.parallel_tool_calls)
            params = dataclasses.replace(params, response_format=("json_schema", json.dumps(schema)))
        return params
