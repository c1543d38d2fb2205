"""POST /v1/responses: OpenAI's Responses API, as the chat request it becomes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictInt

from .chat import _FUNCTION_NAME, ChatCompletionRequest
from .shared import MAX_MESSAGES, Text, _Body


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


# A chat request's field -> the Responses field it is made from (``ResponsesRequest.chat_request``); an
# error about the former names the latter.
_CHAT_FIELDS = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format"}


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

    def param_for(self, chat_param: str | None) -> str | None:
        """The field of this request that a chat request's field came from (``chat_request``)."""
        return _CHAT_FIELDS.get(chat_param, chat_param)

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
