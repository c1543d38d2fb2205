"""Grammar-constrained sampling for ``response_format`` (json_object, json_schema) with xgrammar,
the library vLLM uses: a grammar is compiled once per request, each running row keeps a matcher
that has accepted its generated tokens, and before each sampling step the matchers fill a bitmask
of the tokens they allow."""

from __future__ import annotations

import json
import re

import torch
import xgrammar as xgr
from transformers import PreTrainedTokenizerBase

from ..base import GrammarError


class GrammarCompiler:
    """Compiles response formats for one tokenizer; compiled grammars are cached by xgrammar."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int):
        # vocab_size is the logits' width, which may exceed the tokenizer's own (padded embeddings).
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)

    def compile(self, kind: str, schema: str | None = None) -> xgr.CompiledGrammar | None:
        """``kind`` is response_format.type: "text" (no grammar), "json_object" or "json_schema"
        (``schema`` then holds the JSON schema's text)."""
        if kind == "text":
            return None
        if kind == "json_object":
            schema = json.dumps({"type": "object"})
        try:
            # Compact JSON: free whitespace lets a small model wander into endless newlines.
            return self._compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=True)
        except Exception as exc:  # xgrammar raises RuntimeError / ValueError subclasses of its own
            # Its messages start with "[time] source.cc:line: "; the reason is what follows.
            reason = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(exc)).strip()
            raise GrammarError(f"the JSON schema cannot be used: {reason}") from None


def new_matcher(grammar: xgr.CompiledGrammar | None) -> xgr.GrammarMatcher | None:
    return xgr.GrammarMatcher(grammar) if grammar is not None else None


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    return xgr.allocate_token_bitmask(rows, vocab_size)


def fill_bitmask(bitmask: torch.Tensor, matchers: list, rows: list[int]) -> None:
    for i in rows:
        if matchers[i].is_terminated():  # it ends with this step's token: allow anything
            bitmask[i].fill_(-1)
        else:
            matchers[i].fill_next_token_bitmask(bitmask, i)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)
