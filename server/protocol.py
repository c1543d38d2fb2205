"""OpenAI wire format: request bodies, response bodies and the error object, in one place.

Vendor extensions (sent by the OpenAI SDK through ``extra_body``):
  ``capping``             bool or "auto", request body: cap along the Assistant Axis (default: the
                          server's); "auto" caps from where the conversation or the answer drifts
  ``return_projections``  bool, request body: add ``axis_projections`` to each choice
  ``repetition_penalty``, ``min_tokens``, ``ignore_eos``: vLLM's sampling extensions
Responses add ``capping`` (whether it was applied, or "auto") at the top level, and a gated
request's choices ``capping_from`` (the index of the first token generated capped). The tokenizer endpoints
(``/tokenize``, ``/detokenize``, ``/version``) take and give what vLLM's do.
"""

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


class CalledFunction(_Body):
    name: Text = Field(max_length=64)
    arguments: Text  # JSON text, as OpenAI sends it


class MessageToolCall(_Body):
    id: Text = Field(max_length=128)
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Only an assistant turn (one that made tool calls) may come without content, as in OpenAI's API.
    content: Text | list[TextPart] | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant turn's calls
    tool_call_id: Text | None = None  # a tool message's answer to one of them

    @model_validator(mode="after")
    def _content_required(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content'")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message carries 'tool_calls'")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs 'tool_call_id': the id of the call it answers")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


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


_FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names


class FunctionDefinition(_Body):
    name: str = Field(pattern=_FUNCTION_NAME)
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: StrictBool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self):
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not names:
            raise ValueError("tool_choice requires tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names function {choice.function.name!r}, which is not among the tools")
        if choice not in (None, "none", "auto") and self.response_format is not None \
                and self.response_format.type != "text":
            raise ValueError("a forced tool call and response_format cannot constrain the same output")
        return self

    def functions(self) -> list[dict]:
        """The offered functions' definitions, as the tool-calling code reads them."""
        return [t.function.model_dump() for t in self.tools or []]

    def tool_mode(self) -> tuple[str, str | None]:
        """("none" | "auto" | "required" | "named", the named function). No tools: none; tools without
        a choice: auto, as OpenAI defaults."""
        if not self.tools or self.tool_choice == "none":
            return "none", None
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named", self.tool_choice.function.name
        return self.tool_choice or "auto", None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def generated_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


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


# --- the Responses API (POST /v1/responses) --------------------------------------------------------

class InputText(_Body):
    type: Literal["input_text", "output_text", "text"]
    text: Text


class InputMessage(_Body):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Text | list[InputText]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class FunctionCallItem(_Body):
    type: Literal["function_call"]
    call_id: Text = Field(max_length=128)
    name: Text = Field(max_length=64)
    arguments: Text
    id: Text | None = None


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    call_id: Text = Field(max_length=128)
    output: Text


class ResponsesFunctionTool(_Body):
    type: Literal["function"]
    name: str = Field(pattern=_FUNCTION_NAME)
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class ResponsesToolChoiceFunction(_Body):
    type: Literal["function"]
    name: str


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class TextConfig(_Body):
    format: TextFormat | None = None


class ResponsesRequest(_Body):
    """What axiscap takes of OpenAI's Responses API: text generation with function tools. Turned into a
    chat completion request (``chat_request``), so it is served, capped and checked as one."""

    model: Text
    # At most MAX_MESSAGES items; a text input is bounded by the body size alone.
    input: Text | Annotated[list[InputMessage | FunctionCallItem | FunctionCallOutputItem],
                            Field(max_length=MAX_MESSAGES)]
    instructions: Text | None = None
    max_output_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    tools: list[ResponsesFunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | ResponsesToolChoiceFunction | None = None
    parallel_tool_calls: StrictBool = True
    text: TextConfig | None = None
    stream: StrictBool = False
    store: StrictBool = True
    previous_response_id: Text | None = None
    capping: StrictBool | Literal["auto"] | None = None  # "auto": gated (steering.gate)
    return_projections: StrictBool = False

    def chat_request(self, history: list[dict]) -> ChatCompletionRequest:
        """The same request as a chat completion, after ``history`` (a stored conversation's messages)."""
        messages = list(history)
        if self.instructions:
            messages.insert(0, {"role": "system", "content": self.instructions})
        items = [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for item in items:
            if isinstance(item, InputMessage):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                    messages[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        fmt = self.text.format if self.text is not None else None
        choice = self.tool_choice
        return ChatCompletionRequest(
            model=self.model, messages=messages, max_tokens=self.max_output_tokens, temperature=self.temperature,
            top_p=self.top_p, capping=self.capping, return_projections=self.return_projections,
            tools=[{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                   for t in self.tools] if self.tools else None,
            tool_choice={"type": "function", "function": {"name": choice.name}}
            if isinstance(choice, ResponsesToolChoiceFunction) else choice,
            parallel_tool_calls=self.parallel_tool_calls,
            response_format=None if fmt is None else
            {"type": fmt.type, **({"json_schema": {"name": fmt.name, "schema": fmt.schema_ or {}}}
                                  if fmt.type == "json_schema" else {})})


class TokenizeCompletionRequest(_Body):
    model: Text | None = None
    prompt: Text
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool = False


class TokenizeChatRequest(_Body):
    model: Text | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False


class DetokenizeRequest(_Body):
    model: Text | None = None
    tokens: list[StrictInt]


# --- responses ---------------------------------------------------------------------------------

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


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class _Choice(_Response):
    _only_if_set = frozenset({"axis_projections", "capping_from"})
    index: int
    finish_reason: str | None = None
    axis_projections: list[float | None] | None = None
    capping_from: int | None = None  # a gated request's first capped token (absent: none was)


class ResponseFunction(_Response):
    _only_if_set = frozenset({"name"})
    name: str | None = None
    arguments: str


class ResponseToolCall(_Response):
    _only_if_set = frozenset({"id", "type"})
    id: str | None = None
    type: Literal["function"] | None = None
    function: ResponseFunction


class DeltaToolCall(ResponseToolCall):
    index: int


class AssistantMessage(_Response):
    _only_if_set = frozenset({"tool_calls"})
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(_Choice):
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None


class ChatDelta(_Response):
    _only_if_set = frozenset({"role", "content", "tool_calls"})
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(_Choice):
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class _Completion(_Response):
    _only_if_set = frozenset({"capping_overridden", "usage"})
    id: str
    created: int
    model: str
    capping: bool | Literal["auto"]  # whether capping was applied; "auto": gated, see each choice's capping_from
    capping_overridden: bool | None = None  # the operator's policy overrode the request's 'capping'
    usage: Usage | None = None


class MessageProjection(_Response):
    """One prompt message's monitor projections (its own tokens; the template's around it left out)."""

    role: str
    tokens: int
    mean: float | None  # None for a message with no tokens of its own, or not computed (prefix cache)
    p10: float | None


class ConversationDrift(_Response):
    """The assistant turns' drift statistics (``steering.drift``)."""

    assistant_turns: int
    ewma: float | None
    cusum: float
    tau: float
    ewma_lambda: float
    cusum_slack: float


class PromptProjections(_Response):
    messages: list[MessageProjection]
    drift: ConversationDrift


class _ChatCompletion(_Completion):
    _only_if_set = _Completion._only_if_set | {"prompt_projections"}
    prompt_projections: PromptProjections | None = None  # with return_projections (extension)


class ChatCompletion(_ChatCompletion):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ChatCompletionChunk(_ChatCompletion):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class Completion(_Completion):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "axiscap"


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Response):
    prompt: str


class VersionResponse(_Response):
    version: str
