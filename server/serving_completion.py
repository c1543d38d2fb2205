"""/v1/completions: a text or token-id prompt; ``echo`` and the legacy logprobs shape."""

from __future__ import annotations

import asyncio

from fastapi import Request as HTTPRequest

from .engines import Logprob
from .protocol import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, _GenerationBody
from .serving_engine import ChoiceText, OpenAIServing, Shape


class CompletionShape(Shape):
    """Legacy completions; ``echo`` puts the prompt (and its logprobs) before the completion."""

    id_prefix = "cmpl"

    def __init__(self, serving: OpenAIServing, body: _GenerationBody, prompt_ids: list[int]):
        super().__init__(serving, body, prompt_ids)
        self._offsets: dict[int, int] = {}  # per choice, characters sent so far (logprobs' text_offset)

    def prompt_text(self) -> str:
        prompt = self.body.prompt
        return prompt if isinstance(prompt, str) else self.serving.tokenizer.decode(self.prompt_ids)

    def choice(self, out: ChoiceText, first: bool, streaming: bool):
        text, logprobs = out.text, None
        if self.body.echo and first:
            text = self.prompt_text() + text
        if self.body.logprobs is not None:
            entries = list(out.prompt_logprobs or []) if self.body.echo and first else []
            entries += out.logprobs
            logprobs = self._logprobs(out.index, entries, first)
        return CompletionChoice(index=out.index, text=text, logprobs=logprobs, finish_reason=out.finish_reason,
                                **self._extras(out))

    def _logprobs(self, index: int, entries: list[Logprob | None], first: bool) -> CompletionLogprobs:
        token = self.serving.token_text
        ids = self.prompt_ids if self.body.echo and first else []
        offset = self._offsets.get(index, 0)
        tokens, values, tops, offsets = [], [], [], []
        for k, entry in enumerate(entries):
            text = token(entry.token_id) if entry is not None else token(ids[k])
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            if entry is None:  # the prompt's first token: nothing predicts it
                values.append(None)
                tops.append(None)
                continue
            values.append(entry.logprob)
            # As OpenAI and vLLM: the top alternatives and the chosen token, so up to logprobs + 1.
            tops.append({token(i): v for i, v in [*entry.top, (entry.token_id, entry.logprob)]})
        self._offsets[index] = offset
        return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)

    def response(self, streaming: bool, **fields):
        return Completion(**fields)



class OpenAIServingCompletion(OpenAIServing):
    def completion_prompt_ids(self, body: CompletionRequest) -> list[int]:
        if isinstance(body.prompt, list):
            self.check_token_ids(body.prompt, "prompt")
            return list(body.prompt)
        return self.tokenizer(body.prompt, add_special_tokens=True)["input_ids"]

    async def create(self, body: CompletionRequest, http: HTTPRequest):
        prompt_ids = await asyncio.to_thread(self.completion_prompt_ids, body)  # off the event loop, as chat's
        return await self.respond(CompletionShape(self, body, prompt_ids), http)
