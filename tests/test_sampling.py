"""Per-row sampling: greedy, temperature, top_p, seeds, penalties, bias, min_tokens and logprobs
in one batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from axiscap.server.engines import LOGPROB_FLOOR, SamplingParams
from axiscap.server.engines.hf.sampling import BatchSampler

CPU = torch.device("cpu")
EOS = 7


@dataclass
class Row:
    params: SamplingParams
    prompt_ids: list[int] = field(default_factory=lambda: [1, 2])
    generated_ids: list[int] = field(default_factory=list)
    matcher: object = None

    @property
    def generator(self):
        if not hasattr(self, "_generator"):
            self._generator = BatchSampler.generator_for(self.params, CPU)
        return self._generator


def sampler_for(params, rows=None, vocab=None):
    rows = rows or [Row(p) for p in params]
    s = BatchSampler(CPU, vocab or 200, eos_ids=[EOS])
    s.set_rows(rows)
    return s


def test_greedy_rows_take_the_argmax_next_to_sampled_rows():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    s = sampler_for([SamplingParams(8, temperature=0), SamplingParams(8, temperature=1.0),
                     SamplingParams(8, temperature=0)])
    for _ in range(5):
        out = s.sample(logits)
        assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_tiny_top_p_keeps_only_the_top_token():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1))
    s = sampler_for([SamplingParams(8, temperature=1.5, top_p=1e-6)] * 2)
    assert torch.equal(s.sample(logits), logits.argmax(-1))


def test_top_p_never_samples_outside_the_nucleus():
    logits = torch.tensor([[4.0, 3.5, 0.0, -1.0, -2.0]])  # top two hold ~97% of the mass
    s = sampler_for([SamplingParams(8, temperature=1.0, top_p=0.9)])
    seen = {int(s.sample(logits)) for _ in range(300)}
    assert seen == {0, 1}


def test_seeded_rows_repeat_whatever_else_is_in_the_batch():
    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(2))
    seeded = SamplingParams(8, temperature=1.0, seed=1234)
    a = sampler_for([seeded, SamplingParams(8, temperature=1.0)])
    b = sampler_for([SamplingParams(8, temperature=0.7), SamplingParams(8, temperature=1.0), seeded])
    first = [int(a.sample(logits[:2])[0]) for _ in range(20)]
    second = [int(b.sample(logits[[1, 2, 0]])[2]) for _ in range(20)]
    assert first == second
    assert len(set(first)) > 3  # it really samples


def test_temperature_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    s = sampler_for([SamplingParams(8, temperature=1.0, seed=0)])
    counts = torch.bincount(torch.stack([s.sample(probs.log().unsqueeze(0))[0] for _ in range(3000)]),
                            minlength=3).float() / 3000
    torch.testing.assert_close(counts, probs, atol=0.04, rtol=0)


def test_frequency_and_presence_penalties_subtract_per_row_counts():
    logits = torch.zeros(2, 10)
    logits[:, 3] = 1.0
    rows = [Row(SamplingParams(8, temperature=0, frequency_penalty=0.4, presence_penalty=0.3),
                generated_ids=[3, 3, 3]),
            Row(SamplingParams(8, temperature=0), generated_ids=[3, 3, 3])]
    s = sampler_for(None, rows, vocab=10)
    # Row 0: 1 - 3 * 0.4 - 0.3 = -0.5 < 0, so another token wins; row 1 is not penalized.
    assert s.sample(logits).tolist()[1] == 3
    assert s.sample(logits).tolist()[0] != 3


def test_penalties_follow_the_tokens_sampled_since_the_rows_were_set():
    logits = torch.arange(10.0).expand(1, -1).clone()  # token 9 leads token 8 by 1
    s = sampler_for(None, [Row(SamplingParams(8, temperature=0, frequency_penalty=1.5))], vocab=10)
    # Counted on the device as they are sampled: 9 - 1.5 < 8, then 8 - 1.5 < 9 - 1.5, ...
    assert [s.sample(logits).item() for _ in range(3)] == [9, 8, 9]


def test_repetition_penalty_counts_prompt_tokens_as_vllm_does():
    logits = torch.tensor([[2.0, 1.5, -1.0, -1.2] + [-9.0] * 6])
    s = sampler_for(None, [Row(SamplingParams(8, temperature=0, repetition_penalty=2.0, logprobs=4),
                               prompt_ids=[0, 2])], vocab=10)
    # Token 0: 2.0 / 2 = 1.0 < 1.5; a seen negative logit is multiplied instead: -2.0 < -1.2.
    assert s.sample(logits).tolist() == [1]
    assert s.logprobs.top_ids.tolist() == [[1, 0, 3, 2]]


def test_logit_bias_and_min_tokens_apply_to_their_own_row_only():
    logits = torch.zeros(2, 10)
    logits[:, EOS] = 5.0
    biased = SamplingParams(8, temperature=0, logit_bias=((4, 100.0),))
    min_two = SamplingParams(8, temperature=0, min_tokens=2)
    s = sampler_for([biased, min_two], vocab=10)
    assert s.sample(logits).tolist()[0] == 4
    first, second, third = (s.sample(logits).tolist()[1] for _ in range(3))
    # The first sample() above was the row's first token: EOS masked for tokens 1 and 2 only.
    assert first != EOS and second == EOS and third == EOS
    plain = sampler_for([SamplingParams(8, temperature=0)], vocab=10)
    assert plain.sample(logits[:1]).tolist() == [EOS]


def test_logprobs_are_the_log_softmax_after_temperature():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(3))
    s = sampler_for([SamplingParams(8, temperature=0.5, seed=1, logprobs=3), SamplingParams(8, temperature=0)],
                    vocab=50)
    tokens = s.sample(logits)
    expected = (logits / torch.tensor([[0.5], [1.0]])).log_softmax(-1)
    torch.testing.assert_close(s.logprobs.chosen, expected.gather(1, tokens[:, None])[:, 0])
    top = expected.topk(3, -1)
    assert torch.equal(s.logprobs.top_ids, top.indices)
    torch.testing.assert_close(s.logprobs.top_values, top.values)


def test_logprobs_of_masked_tokens_stay_finite():
    s = sampler_for(None, [Row(SamplingParams(8, temperature=0, min_tokens=5, logprobs=8))], vocab=8)
    s.sample(torch.zeros(1, 8))
    assert s.logprobs.top_ids[0, -1].item() == EOS  # masked by min_tokens
    assert s.logprobs.top_values[0, -1].item() == LOGPROB_FLOOR


@pytest.mark.parametrize("greedy", [True, False])
def test_no_logprobs_unless_a_row_asks(greedy):
    s = sampler_for([SamplingParams(8, temperature=0 if greedy else 1.0)])
    s.sample(torch.randn(1, 200))
    assert s.logprobs is None
