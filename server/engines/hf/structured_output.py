"""Grammar-constrained sampling for ``response_format`` (json_object, json_schema) with xgrammar,
the library vLLM uses: a grammar is compiled once per request (``..grammar``), each running row keeps a matcher
that has accepted its generated tokens, and before each sampling step the matchers fill a bitmask
of the tokens they allow."""

from __future__ import annotations

import torch
import xgrammar as xgr


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
