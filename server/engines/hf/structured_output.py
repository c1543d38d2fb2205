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


def packed_token_mask(token_ids, vocab_size: int) -> torch.Tensor:
    """A bitmask in xgrammar's packed layout (int32 words, token t at bit t % 32 of word t // 32)."""
    mask = torch.zeros_like(allocate_bitmask(1, vocab_size)[0])
    for t in token_ids:
        word = int(mask[t // 32]) | (1 << (t % 32))
        mask[t // 32] = word - (1 << 32) if word >= 1 << 31 else word
    return mask


def only_allows(bitmask: torch.Tensor, row: int, tokens: torch.Tensor) -> bool:
    """Whether the filled (host) bitmask row allows no token outside ``tokens`` (a packed mask)."""
    return not bool((bitmask[row] & ~tokens).any())
