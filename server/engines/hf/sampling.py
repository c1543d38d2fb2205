"""Per-row sampling for a batch: each row has its own temperature, top_p, seed, penalties, bias,
min_tokens, grammar and logprobs.

The order is vLLM's: logit_bias, min_tokens (end-of-sequence masked), repetition / frequency /
presence penalties, the grammar's mask, then temperature and top_p. Logprobs are the log-softmax of
the logits after every step but top_p, divided by the temperature (by 1 when greedy): what vLLM
reports with ``--logprobs-mode processed_logprobs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..base import LOGPROB_FLOOR, SamplingParams
from .structured_output import allocate_bitmask, apply_bitmask, fill_bitmask, only_allows, packed_token_mask


class SamplingRow(Protocol):
    """What the sampler reads of a running request."""

    params: SamplingParams
    generator: torch.Generator | None
    matcher: Any  # the grammar matcher that has seen every generated token, or None
    prompt_ids: list[int]
    generated_ids: list[int]


@dataclass
class TokenLogprobs:
    """Per row of one step: the chosen token's logprob and the top alternatives (ids, logprobs)."""

    chosen: torch.Tensor  # [rows]
    top_ids: torch.Tensor  # [rows, k]
    top_values: torch.Tensor  # [rows, k]


class BatchSampler:
    """Holds the batch's sampling state as device tensors, rebuilt from the rows' host-side token
    lists only when rows join or leave, and advanced on the device at every step.

    Sampling uses the exponential race (argmax of p / E, E ~ Exp(1)), which equals drawing from p;
    a seeded request draws its noise from its own generator, so its tokens do not depend on which
    other requests share the batch.
    """

    def __init__(self, device: torch.device, vocab_size: int, eos_ids: Sequence[int] = ()):
        self.device, self.vocab_size = device, vocab_size
        self._eos_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self._eos_mask[list(eos_ids)] = True
        self._eos_packed = packed_token_mask(eos_ids, vocab_size)  # the same, in the grammar bitmask's layout
        self._shared = torch.Generator(device=device)
        self._shared.seed()
        self.logprobs: TokenLogprobs | None = None  # of the last sample(), for rows that asked
        self.set_rows([])

    def set_rows(self, rows: Sequence[SamplingRow]) -> None:
        params = [row.params for row in rows]
        n, device = len(rows), self.device
        self._generators = [row.generator for row in rows]
        self._matchers = [row.matcher for row in rows]
        self._all_greedy = all(p.temperature == 0 for p in params)
        self._any_top_p = any(p.top_p < 1 for p in params)
        self._temperature = torch.tensor([p.temperature for p in params], device=device)
        self._top_p = torch.tensor([p.top_p for p in params], device=device)
        self._top_k = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        self._bias = None
        if any(p.logit_bias for p in params):
            self._bias = torch.zeros(n, self.vocab_size, device=device)
            for i, p in enumerate(params):
                for token, bias in p.logit_bias:
                    self._bias[i, token] = bias
        self._counts = None  # [rows, vocab] generated tokens; with the prompt's tokens for repetition
        if any(p.penalized for p in params):
            self._counts = torch.zeros(n, self.vocab_size, device=device)
            self._in_prompt = torch.zeros(n, self.vocab_size, dtype=torch.bool, device=device)
            for i, row in enumerate(rows):
                if row.generated_ids:
                    self._counts[i].index_add_(0, torch.tensor(row.generated_ids, device=device),
                                               torch.ones(len(row.generated_ids), device=device))
                if row.params.repetition_penalty != 1:
                    self._in_prompt[i, torch.tensor(row.prompt_ids, device=device)] = True
            self._generated = torch.tensor([len(row.generated_ids) for row in rows], device=device)
            self._min_tokens = torch.tensor([p.min_tokens for p in params], device=device)
            self._presence = torch.tensor([p.presence_penalty for p in params], device=device)
            self._frequency = torch.tensor([p.frequency_penalty for p in params], device=device)
            self._repetition = torch.tensor([p.repetition_penalty for p in params], device=device)
        self._grammar_rows = [i for i, m in enumerate(self._matchers) if m is not None]
        self._bitmask = None
        if self._grammar_rows:
            self._bitmask = allocate_bitmask(n, self.vocab_size)

    @staticmethod
    def generator_for(params: SamplingParams, device: torch.device) -> torch.Generator | None:
        if params.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(params.seed)
        return g

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [batch, vocab] -> token ids [batch] on the device, with no host sync (the grammar's
        mask is filled on the host from its matchers, which already know every token)."""
        self.logprobs = None
        logits = self._processed(logits)
        greedy = logits.argmax(-1)
        if self._all_greedy and self._top_k is None:
            tokens = greedy
        else:
            scaled = logits.float() / torch.where(self._temperature == 0, 1.0, self._temperature).unsqueeze(-1)
            if self._top_k is not None:
                logprobs = scaled.log_softmax(-1)
            if self._all_greedy:
                tokens = greedy
            else:
                if self._any_top_p:
                    scaled = self._top_p_filter(scaled)
                probs = scaled.softmax(-1)
                race = probs / self._exponential_noise(probs.shape)
                tokens = torch.where(self._temperature == 0, greedy, race.argmax(-1))
            if self._top_k is not None:
                top = logprobs.topk(self._top_k, -1) if self._top_k else None
                self.logprobs = TokenLogprobs(
                    logprobs.gather(1, tokens[:, None])[:, 0].clamp(min=LOGPROB_FLOOR),
                    top.indices if top else tokens.new_zeros(len(tokens), 0),
                    top.values.clamp(min=LOGPROB_FLOOR) if top else logprobs.new_zeros(len(tokens), 0))
        if self._counts is not None:
            rows = torch.arange(len(tokens), device=self.device)
            self._counts.index_put_((rows, tokens), torch.ones(len(tokens), device=self.device), accumulate=True)
            self._generated += 1
        return tokens

    def _processed(self, logits: torch.Tensor) -> torch.Tensor:
        if self._bias is None and self._counts is None and not self._grammar_rows:
            return logits
        given, logits = logits, logits.float()
        if self._grammar_rows:  # filled on the host first: min_tokens must know where a grammar ends
            fill_bitmask(self._bitmask, self._matchers, self._grammar_rows)
        if self._bias is not None:
            logits = logits + self._bias
        if self._counts is not None:
            early = self._generated < self._min_tokens  # min_tokens: no end of sequence yet
            # A grammar that allows nothing but the end (a finished JSON document) ends the output,
            # min_tokens or not: masking its one token would leave nothing to sample.
            ended = [i for i in self._grammar_rows if only_allows(self._bitmask, i, self._eos_packed)]
            if ended:
                early = early.index_fill(0, torch.tensor(ended, device=self.device), False)
            logits = logits.masked_fill(early.unsqueeze(-1) & self._eos_mask, float("-inf"))
            seen = (self._counts > 0) | self._in_prompt
            repetition = self._repetition.unsqueeze(-1)
            penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
            logits = torch.where(seen, penalized, logits)
            logits = logits - self._frequency.unsqueeze(-1) * self._counts \
                - self._presence.unsqueeze(-1) * (self._counts > 0)
        if self._grammar_rows:
            if logits is given:  # the mask writes in place: never into the model's own output
                logits = logits.clone()
            apply_bitmask(logits, self._bitmask, self._grammar_rows)
        return logits

    def _top_p_filter(self, scaled: torch.Tensor) -> torch.Tensor:
        sorted_logits, order = scaled.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass before it already reaches top_p; the top token always stays.
        drop = (probs.cumsum(-1) - probs) >= self._top_p.unsqueeze(-1)
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)

    def _exponential_noise(self, shape: torch.Size) -> torch.Tensor:
        uniform = torch.rand(shape, generator=self._shared, device=self.device)
        for row, g in enumerate(self._generators):
            if g is not None:
                uniform[row] = torch.rand(shape[-1], generator=g, device=self.device)
        # u lies in [0, 1); the floor keeps E > 0 so p / E stays finite.
        return (-torch.log1p(-uniform)).clamp_(min=1e-20)
