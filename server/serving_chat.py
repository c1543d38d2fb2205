"""/v1/chat/completions: the chat template renders the prompt (with tools, ``tool_calling``); chat-shaped
choices and chunks, tool calls among them."""

from __future__ import annotations

import asyncio
import dataclasses
import json

from fastapi import Request as HTTPRequest

from axiscap.steering.drift import conversation_drift

from .chat_template import ChatPrompt, MessageSpan
from .engines import GrammarError, Logprob, Request, SamplingParams
from .protocol import (APIError, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                       ChatCompletionRequest, ChatDelta, ChatLogprobs, ChatTokenLogprob, DeltaToolCall,
                       PromptProjections, ResponseFunction, ResponseToolCall, TopLogprob)
from .serving_engine import ChoiceText, OpenAIServing, Shape
from .tool_calling import Call, forced_calls, forced_schema, held_from, parse_calls


class ChatShape(Shape):
    id_prefix = "chatcmpl"

    def __init__(self, serving: OpenAIServingChat, body: ChatCompletionRequest, prompt: ChatPrompt):
        super().__init__(serving, body, prompt.ids)
        self.spans = prompt.spans
        self._prompt_figures: PromptProjections | None = None
        self._figures_sent = False
        self.mode, self.named = body.tool_mode()
        self.functions = body.functions()
        self.parser = serving.settings.tool_call_parser
        # Streaming with tools: per choice, the text so far and how much of it went out as content.
        self._text: dict[int, str] = {}
        self._sent: dict[int, int] = {}

    def choice(self, out: ChoiceText, first: bool, streaming: bool):
        if out.prompt_projections is not None and self._prompt_figures is None and self.spans is not None:
            self._prompt_figures = figures = prompt_figures(out.prompt_projections, self.spans, self.serving.axis_stats)
            turns = [m for m in figures.messages if m.role == "assistant"]
            if turns and turns[-1].mean is not None:  # once per request: drift over turns, for live traffic
                self.serving.metrics.observe_previous_turn(len(turns), turns[-1].mean)
        logprobs = None
        if self.body.logprobs:
            logprobs = ChatLogprobs(content=[self._token_logprob(lp) for lp in out.logprobs])
        if streaming:
            delta = self._delta(out, first)
            calls = self.mode == "named" or bool(delta.tool_calls)
            return ChatChunkChoice(index=out.index, delta=delta, logprobs=logprobs,
                                   finish_reason=self._finish(out, calls), **self._extras(out))
        content, calls = self.split(out.text)
        message = AssistantMessage(content=content.strip() or None if calls else content)
        if calls:
            message.tool_calls = [ResponseToolCall(id=Call.new_id(), type="function",
                                                   function=ResponseFunction(name=c.name, arguments=c.arguments))
                                  for c in calls]
        return ChatChoice(index=out.index, message=message, logprobs=logprobs,
                          finish_reason=self._finish(out, calls), **self._extras(out))

    def split(self, text: str) -> tuple[str, list[Call]]:
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
        content, calls = self.split(text)  # the end: what was held back, and the calls
        rest = content[sent:] if self.mode == "auto" else ""
        deltas = [DeltaToolCall(index=k, id=Call.new_id(), type="function",
                                function=ResponseFunction(name=c.name, arguments=c.arguments))
                  for k, c in enumerate(calls)]
        fields = {**role, **({"content": rest} if rest else {}), **({"tool_calls": deltas} if deltas else {})}
        return ChatDelta(**fields)

    def envelope_extras(self) -> dict:
        """The prompt's per-message projections, once: in the whole response, or in the first chunk."""
        if self._prompt_figures is None or self._figures_sent or not self.body.return_projections:
            return {}
        self._figures_sent = True
        return {"prompt_projections": self._prompt_figures}

    def _token_logprob(self, lp: Logprob) -> ChatTokenLogprob:
        token = self.serving.token_text
        top = [TopLogprob(token=token(i), logprob=v, bytes=list(token(i).encode())) for i, v in lp.top]
        return ChatTokenLogprob(token=token(lp.token_id), logprob=lp.logprob, bytes=list(token(lp.token_id).encode()),
                                top_logprobs=top)

    def response(self, streaming: bool, **fields):
        return (ChatCompletionChunk if streaming else ChatCompletion)(**fields)


class OpenAIServingChat(OpenAIServing):
    @property
    def axis_stats(self) -> tuple[float, float | None]:
        """tau at the monitor layer, and the default Assistant's spread there where the axis file has it."""
        return self.axis.monitor_tau, self.axis.monitor_std

    async def prompt(self, body: ChatCompletionRequest) -> ChatPrompt:
        """The prompt, tools included. Tokenizing runs in a thread (the tokenizer lets go of the GIL): a
        megabyte of prompt takes a second, and on the event loop every stream would stall for it."""
        mode = body.tool_mode()[0]
        if mode == "auto":  # a forced call's schema is compiled with its grammar; here it is only checked
            schema = forced_schema(body.functions(), None, True)
            try:
                await self.engine.grammars.compile("json_schema", json.dumps(schema))
            except GrammarError as exc:
                raise APIError(400, f"tools: {exc}", param="tools") from None
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if mode != "none" else None
        return await asyncio.to_thread(self.chat_prompt, body.messages, True, tools)

    async def create(self, body: ChatCompletionRequest, http: HTTPRequest):
        return await self.respond(ChatShape(self, body, await self.prompt(body)), http)

    async def start(self, shape: ChatShape) -> list[Request]:
        try:
            return await super().start(shape)
        except APIError as exc:
            if exc.param == "response_format" and shape.mode in ("named", "required"):
                exc.param = "tools"  # the grammar came from a function's parameters
            raise

    def sampling_params(self, body: ChatCompletionRequest, prompt_ids: list[int],
                        spans: list[MessageSpan] | None = None) -> SamplingParams:
        params = super().sampling_params(body, prompt_ids, spans)
        # The prompt's projections too: for its per-message figures, and for the previous-turn metric.
        watched = self.settings.persona_metrics and any(m.role == "assistant" for m in body.messages)
        # Figures the client asked for are complete; the metric alone does not cost a prefix-cache hit.
        if body.return_projections or watched:
            params = dataclasses.replace(params, prompt_projections="all" if body.return_projections else "computed")
        mode, named = body.tool_mode()
        if mode in ("named", "required"):  # sampling follows the calls' JSON schema
            schema = forced_schema(body.functions(), named, body.parallel_tool_calls)
            params = dataclasses.replace(params, response_format=("json_schema", json.dumps(schema)))
        return params


def prompt_figures(projections: list[float | None], spans: list[MessageSpan],
                   axis_stats: tuple[float, float | None]) -> PromptProjections:
    """Each prompt message's mean and 10th percentile, and the drift of its assistant turns. A message
    with a token the engine did not compute (a prefix-cache hit) has no figures."""
    tau, assistant_std = axis_stats
    messages = []
    for span in spans:
        own = projections[span.start:span.end]
        tokens, own = len(own), (sorted(own) if None not in own else [])
        messages.append({"role": span.role, "tokens": tokens, "mean": sum(own) / len(own) if own else None,
                         "p10": own[int(0.1 * (len(own) - 1))] if own else None})
    turns = [m["mean"] for m in messages if m["role"] == "assistant" and m["mean"] is not None]
    return PromptProjections(messages=messages, drift=conversation_drift(turns, tau, assistant_std).as_dict())
