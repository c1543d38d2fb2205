"""Chat prompts for families with and without a system role."""

from __future__ import annotations

import copy

import pytest

from axiscap.server.chat_template import ChatTemplateError, chat_prompt_ids

NO_SYSTEM_TEMPLATE = (  # like Gemma 2's: a system turn is an error
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def test_system_prompt_folds_into_the_first_user_turn_for_families_without_one(smollm2):
    tok = copy.deepcopy(smollm2.tokenizer)
    tok.chat_template = NO_SYSTEM_TEMPLATE
    ids = chat_prompt_ids(tok, [{"role": "system", "content": "You are a pirate."},
                                {"role": "user", "content": "Hello?"}])
    assert tok.decode(ids) == "<start_of_turn>user\nYou are a pirate.\n\nHello?<end_of_turn>\n<start_of_turn>model\n"
    with pytest.raises(ChatTemplateError):
        chat_prompt_ids(tok, [{"role": "system", "content": "alone"}])


def test_system_role_is_kept_where_the_template_has_one(smollm2):
    ids = chat_prompt_ids(smollm2.tokenizer, [{"role": "system", "content": "You are a pirate."},
                                              {"role": "user", "content": "Hello?"}])
    text = smollm2.tokenizer.decode(ids)
    assert "<|im_start|>system\nYou are a pirate.<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
