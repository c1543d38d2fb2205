"""/v1/chat/completions: the chat template renders the prompt; chat-shaped choices and chunks."""

from __future__ import annotations

import asyncio

from fastapi import Request as HTTPRequest

from .engines import Logprob
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                       ChatCompletionRequest, ChatDelta, ChatLogprobs, ChatTokenLogprob, TopLogprob)
from .serving_engine import ChoiceText, OpenAIServing, Shape


class ChatShape(Shape):
    id_prefix = "chatcmpl"

    def choice(self, out: ChoiceText, first: bool, streaming: bool):
        logprobs = None
        if self.body.logprobs:
            logprobs = ChatLogprobs(content=[self._token_logprob(lp) for lp in out.logprobs])
        if streaming:
            delta = ChatDelta(role="assistant", content=out.text) if first else \
                (ChatDelta(content=out.text) if out.text else ChatDelta())
            return ChatChunkChoice(index=out.index, delta=delta, logprobs=logprobs, finish_reason=out.finish_reason,
                                   **self._extras(out))
        return ChatChoice(index=out.index, message=AssistantMessage(content=out.text), logprobs=logprobs,
                          finish_reason=out.finish_reason, **self._extras(out))

    def _token_logprob(self, lp: Logprob) -> ChatTokenLogprob:
        token = self.serving.token_text
        top = [TopLogprob(token=token(i), logprob=v, bytes=list(token(i).encode())) for i, v in lp.top]
        return ChatTokenLogprob(token=token(lp.token_id), logprob=lp.logprob, bytes=list(token(lp.token_id).encode()),
                                top_logprobs=top)

    def response(self, streaming: bool, **fields):
        return (ChatCompletionChunk if streaming else ChatCompletion)(**fields)



class OpenAIServingChat(OpenAIServing):
    async def create(self, body: ChatCompletionRequest, http: HTTPRequest):
        # Tokenizing runs in a thread (the tokenizer lets go of the GIL): a megabyte of prompt takes a
        # second, and on the event loop every stream would stall for it.
        prompt_ids = await asyncio.to_thread(self.chat_prompt_ids, body.messages)
        return await self.respond(ChatShape(self, body, prompt_ids), http)
