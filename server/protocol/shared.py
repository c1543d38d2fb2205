"""What every endpoint's bodies share: the error object, text and limits, the generation fields
that chat and completions have in common, usage and the response envelope."""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator,
                      model_serializer, model_validator)


# A seed is handed to torch.Generator.manual_seed, which takes a 64-bit value: bound it as vLLM does.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_MESSAGES = 512  # a chat longer than this is refused before its template is rendered
MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI bounds top_logprobs
_TOKEN_ID = re.compile(r"-?[0-9]+")


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
    return ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code)).model_dump()


def _encodable(text: str) -> str:
    # JSON can carry a lone UTF-16 surrogate ("\ud800"); no tokenizer can encode one.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone UTF-16 surrogate, which is not valid Unicode text") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


_UNION_TAGS = {"str", "int", "bool", "float", "dict", "list", "none"}


def validation_message(errors) -> tuple[str, str | None]:
    """One error as OpenAI puts it: a message and the parameter's dotted path. Where a union's members
    each failed, a constraint one breaks ("at most 512 items") says more than "not a string": the first
    error that is not a mere type mismatch, else the first."""
    first = next((e for e in errors if not e.get("type", "").endswith("_type")), errors[0])
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    # pydantic names the union member it tried ("str", "function-after[...]"): not part of the path.
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and str(p) not in _UNION_TAGS and "[" not in str(p)]
    param = ".".join(loc) or None
    msg = first["msg"].removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


class _Body(BaseModel):
    # The SDK sends fields we do not use (user, metadata, ...): accept and ignore them. JSON's NaN
    # and Infinity (Python's json reads them) are refused as what they are, not as out of range.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: StrictBool = False


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class JSONSchemaFormat(_Body):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object")
        return self


class _GenerationBody(_Body):
    model: Text
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: StrictInt = Field(1, ge=1, description="choices to generate (the server bounds it: --max-n)")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=100)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    min_tokens: StrictInt = Field(0, ge=0)
    ignore_eos: StrictBool = False
    response_format: ResponseFormat | None = None
    capping: StrictBool | Literal["auto"] | None = None  # "auto": gated (steering.gate)
    return_projections: StrictBool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):  # vLLM refuses it too: it would end every completion at once
            raise ValueError("a stop sequence must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v):
        # ASCII digits only: str.isdigit() also takes "²" and other Unicode digits, which int() refuses.
        if v is not None and not all(_TOKEN_ID.fullmatch(k) for k in v):
            raise ValueError("keys must be token ids (decimal integers)")
        return v

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def generated_logprobs(self) -> int | None:
        """Top alternatives per generated token, or None when logprobs are not wanted."""
        raise NotImplementedError


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class _Response(BaseModel):
    """OpenAI's fields are always sent (``null`` included); the fields named in ``_only_if_set``
    (extensions, and ``usage`` in chunks) appear only when they were given."""

    _only_if_set: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _leave_out_unset(self, handler):
        data = handler(self)
        for name in self._only_if_set - self.model_fields_set:
            data.pop(name, None)
        return data


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorInfo


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class _Choice(_Response):
    _only_if_set = frozenset({"axis_projections", "capping_from", "drift"})
    index: int
    finish_reason: str | None = None
    axis_projections: list[float | None] | None = None
    capping_from: int | None = None  # a gated request's first capped token (absent: none was)
    # A gated request's gate: {"tripped": false}, or where and why it tripped (``steering.gate.Trip``).
    drift: dict[str, Any] | None = None


class _Completion(_Response):
    _only_if_set = frozenset({"capping_overridden", "usage"})
    id: str
    created: int
    model: str
    capping: bool | Literal["auto"]  # whether capping was applied; "auto": gated, see each choice's capping_from
    capping_overridden: bool | None = None  # the operator's policy overrode the request's 'capping'
    usage: Usage | None = None
