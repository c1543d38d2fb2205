"""/tokenize and /detokenize, as vLLM's."""

from __future__ import annotations

from .chat import ChatMessage
from .shared import MAX_MESSAGES, Text, _Body, _Response


from pydantic import Field, StrictBool, StrictInt


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


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Response):
    prompt: str
