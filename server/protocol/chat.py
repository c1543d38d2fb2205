"""POST /v1/chat/completions: messages, tools, and the chat completion and its chunks."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, StrictBool, StrictInt, model_validator

from .shared import (MAX_LOGPROBS, MAX_MESSAGES, Text, TextPart, TopLogprob, _Body, _Choice, _Completion,
                     _GenerationBody, _Response)


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


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


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
