"""POST /v1/completions: a prompt, and the completion."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool, StrictInt, field_validator

from .shared import MAX_LOGPROBS, Text, _Choice, _Completion, _GenerationBody, _Response


class CompletionRequest(_GenerationBody):
    prompt: Text | list[Text] | list[StrictInt]
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def generated_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported")
            return v[0]
        if isinstance(v, list) and not v:
            raise ValueError("prompt is empty")
        return v


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class Completion(_Completion):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
