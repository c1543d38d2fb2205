"""Chat messages to prompt token ids, for every model family the server and the axis builder meet."""

from __future__ import annotations

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase


class ChatTemplateError(ValueError):
    """The model's chat template refuses these messages."""


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
    """Render ``messages`` with the model's chat template, ready for the assistant's turn (unless
    ``add_generation_prompt`` is off).

    Families whose template has no system role (Gemma 2) get the system instruction prepended to the
    first user turn; a model without a template gets plain ``role: content`` lines.
    """
    if tokenizer.chat_template is None:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant:" if add_generation_prompt else "")
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    render = lambda ms: tokenizer.apply_chat_template(  # noqa: E731
        ms, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)
    try:
        text = render(messages)
    except TemplateError as exc:
        if messages[0]["role"] != "system" or len(messages) < 2:
            raise ChatTemplateError(f"the chat template rejected these messages: {exc}") from None
        system, first, *rest = messages
        try:
            text = render([{**first, "content": f"{system['content']}\n\n{first['content']}"}, *rest])
        except TemplateError as exc:
            raise ChatTemplateError(f"the chat template rejected these messages: {exc}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]
