"""OpenAI wire format: request bodies, response bodies and the error object, in one place.

Vendor extensions (sent by the OpenAI SDK through ``extra_body``):
  ``capping``             bool, request body: cap along the Assistant Axis (default: the server's)
  ``return_projections``  bool, request body: add ``axis_projections`` to each choice
Responses add ``capping`` (whether it was applied) at the top level.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

# A seed is handed to torch.Generator.manual_seed, which takes a 64-bit value: bound it as vLLM does.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_MESSAGES = 512  # a chat longer than this is refused before its template is rendered


class APIError(Exception):
    """An error the client caused or can act on, sent as an OpenAI error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _encodable(text: str) -> str:
    # JSON can carry a lone UTF-16 surrogate ("\ud800"); no tokenizer can encode one.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone UTF-16 surrogate, which is not valid Unicode text") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class _Body(BaseModel):
    # The SDK sends fields we do not use (user, metadata, ...): accept and ignore them.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Only an assistant turn (one that made tool calls) may come without content, as in OpenAI's API.
    content: Text | list[TextPart] | None = None

    @model_validator(mode="after")
    def _content_required(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content'")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class _GenerationBody(_Body):
    model: Text
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: StrictInt = Field(1, ge=1, le=1, description="only one choice per request is supported")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    capping: StrictBool | None = None
    return_projections: StrictBool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_GenerationBody):
    prompt: Text | list[Text] | list[StrictInt]
    echo: StrictBool = False
    logprobs: StrictInt | None = None

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


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "axiscap"}
