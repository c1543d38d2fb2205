"""Compiling a ``response_format`` into an xgrammar grammar, with the reason a schema is refused.

The transformers engine samples under the compiled grammar. The vLLM engine compiles too, before
it submits, only to answer a schema xgrammar cannot compile with a 400: vLLM's own request check
merely parses the schema, and a compile failure in its engine core fails the request as a 500.
"""

from __future__ import annotations

import json
import re

import xgrammar as xgr
from transformers import PreTrainedTokenizerBase

from .base import GrammarError


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
