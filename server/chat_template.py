"""Chat messages to prompt token ids, for every model family the server and the axis builder meet."""

from __future__ import annotations

from dataclasses import dataclass

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase


class ChatTemplateError(ValueError):
    """The model's chat template refuses these messages."""


@dataclass(frozen=True)
class MessageSpan:
    """Where one message's own text lies among the prompt's tokens (template tokens around it excluded)."""

    role: str
    start: int
    end: int  # exclusive


@dataclass(frozen=True)
class ChatPrompt:
    ids: list[int]
    spans: list[MessageSpan] | None  # None where the tokenizer gives no character offsets (slow tokenizers)


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
    return render_chat(tokenizer, messages, add_generation_prompt, tools, spans=False).ids


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = True,
                tools: list[dict] | None = None, spans: bool = True) -> ChatPrompt:
    """Render ``messages`` with the model's chat template, ready for the assistant's turn (unless
    ``add_generation_prompt`` is off), and find each message's tokens.

    Families whose template has no system role (Gemma 2) get the system instruction prepended to the
    first user turn; a model without a template gets plain ``role: content`` lines.
    """
    if tokenizer.chat_template is None:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant:" if add_generation_prompt else "")
        return _tokenized(tokenizer, text, messages, spans)
    render = lambda ms: tokenizer.apply_chat_template(  # noqa: E731
        ms, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)
    try:
        return _tokenized(tokenizer, render(messages), messages, spans)
    except TemplateError as exc:
        if messages[0]["role"] != "system" or len(messages) < 2:
            raise ChatTemplateError(f"the chat template rejected these messages: {exc}") from None
        system, first, *rest = messages
        merged = [{**first, "content": f"{system['content']}\n\n{first['content']}"}, *rest]
        try:
            return _tokenized(tokenizer, render(merged), merged, spans)
        except TemplateError as exc:
            raise ChatTemplateError(f"the chat template rejected these messages: {exc}") from None


def _tokenized(tokenizer: PreTrainedTokenizerBase, text: str, messages: list[dict], spans: bool) -> ChatPrompt:
    if not spans or not tokenizer.is_fast:
        return ChatPrompt(tokenizer(text, add_special_tokens=False)["input_ids"], None)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    found, cursor, k = [], 0, 0
    for m in messages:
        content = m.get("content") or ""
        at = text.find(content, cursor) if content else -1
        if at < 0:  # the template left it out (or it is empty): no tokens of its own
            found.append(MessageSpan(m["role"], k, k))
            continue
        start, end = at, at + len(content)
        cursor = end
        while k < len(offsets) and offsets[k][0] < start:
            k += 1
        first = k
        while k < len(offsets) and offsets[k][1] <= end:
            k += 1
        found.append(MessageSpan(m["role"], first, k))
    return ChatPrompt(encoded["input_ids"], found)
