"""Per-row sampling: greedy, temperature, top_p and seeds in one batch."""

from __future__ import annotations

import torch

from axiscap.server.sampling import BatchSampler, SamplingParams

CPU = torch.device("cpu")


def sampler_for(params):
    s = BatchSampler(CPU)
    s.set_rows(params, [BatchSampler.generator_for(p, CPU) for p in params])
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
