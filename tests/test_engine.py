"""The engine with the real SmolLM2 and its shipped axis: mixed batches, admission, cancellation."""

from __future__ import annotations

import asyncio
from contextlib import contextmanager

import pytest

from axiscap.server.engines import DoesNotFit, QueueFull, SamplingParams
from axiscap.server.engines.hf.engine import Engine
from axiscap.server.engines.hf.kv_slots import slot_capacity
from axiscap.server.metrics import ServingMetrics

from .conftest import chat_ids

ORACLE = ("You are an ancient oracle who speaks in cryptic prophecies from the temple at Delphi. "
          "You see the threads of fate.")


@contextmanager
def running_engine(loaded, axis, start: bool = True, **kwargs):
    """An engine on the real model (its thread started unless ``start`` is off), stopped afterwards."""
    engine = Engine(loaded, axis, ServingMetrics(loaded.name, axis.cap_layers, [0.0]), **kwargs)
    if start:
        engine.start()
    try:
        yield engine
    finally:
        engine.stop()


async def collect(engine, ids, params):
    request = await engine.submit(ids, params)
    text, tokens, projections, finish = "", [], [], None
    async for d in request.deltas():
        text += d.text
        tokens += d.token_ids
        projections += d.projections
        finish = d.finish_reason
    return text, tokens, projections, finish


def assert_same_generation(a, b):
    assert a[1] == b[1] and a[0] == b[0] and a[3] == b[3]
    assert len(a[2]) == len(a[1])
    assert max(abs(x - y) for x, y in zip(a[2], b[2])) < 1e-3 * max(1.0, max(abs(x) for x in a[2]))


def test_mixed_batch_equals_each_request_alone(smollm2, smollm2_axis, caplog, recwarn):
    tok = smollm2.tokenizer
    jobs = [
        (chat_ids(tok, "What is the capital of France?"), SamplingParams(24, temperature=0, capping=True)),
        (chat_ids(tok, "Will I be happy?", ORACLE), SamplingParams(20, temperature=0, capping=False)),
        (chat_ids(tok, "Will I be happy?", ORACLE), SamplingParams(20, temperature=0, capping=True)),
        (chat_ids(tok, "Count from one to twenty in words."), SamplingParams(30, temperature=0, capping=False,
                                                                            stop=("five",))),
        (chat_ids(tok, "Write a poem."), SamplingParams(16, temperature=0.8, seed=7, capping=True)),
    ]
    with running_engine(smollm2, smollm2_axis) as engine:
        async def both():
            together = await asyncio.gather(*[collect(engine, ids, p) for ids, p in jobs])
            alone = [await collect(engine, ids, p) for ids, p in jobs]
            return together, alone
        together, alone = asyncio.run(both())
    for t, a in zip(together, alone):
        assert_same_generation(t, a)
    # Together really was one group, prompts of several lengths ending in one slice (not a failed group
    # retried one by one, which gives the same tokens): make test runs this in vLLM's environment too,
    # whose older transformers once failed every such group.
    assert "prefill of" not in caplog.text
    # The forward gets the KV cache under the name the installed transformers takes (no warning each step).
    assert [str(w.message) for w in recwarn if "past_key_values" in str(w.message)] == []
    # The same oracle prompt with and without capping must differ: the rows really were treated apart.
    assert together[1][1] != together[2][1]
    assert together[3][3] == "stop" and "five" not in together[3][0].lower().split()[-1:]
    assert together[0][3] == "stop" and "Paris" in together[0][0]
    assert together[4][3] == "length" and len(together[4][1]) == 16


def test_request_admitted_mid_generation_matches_alone(smollm2, smollm2_axis):
    tok = smollm2.tokenizer
    long_ids = chat_ids(tok, "Tell me a long story about a lighthouse keeper.")
    short_ids = chat_ids(tok, "hi")
    long_p, short_p = SamplingParams(40, temperature=0, capping=False), SamplingParams(12, temperature=0)
    with running_engine(smollm2, smollm2_axis) as engine:
        async def staggered():
            first = asyncio.create_task(collect(engine, long_ids, long_p))
            while not engine.runner.rows or engine.runner.rows[0].generated < 4:  # the long one is decoding
                await asyncio.sleep(0.005)
            second = await collect(engine, short_ids, short_p)
            return await first, second, await collect(engine, long_ids, long_p), await collect(engine, short_ids, short_p)
        joined_long, joined_short, alone_long, alone_short = asyncio.run(staggered())
    assert_same_generation(joined_long, alone_long)
    assert_same_generation(joined_short, alone_short)


def test_oracle_prompt_projects_lower_and_capping_raises_it(smollm2, smollm2_axis):
    tok = smollm2.tokenizer
    questions = ["What should I do with my life?", "Will I be happy?", "What is the weather like today?"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    with running_engine(smollm2, smollm2_axis) as engine:
        async def measure():
            out = {}
            for name, system, capping in [("plain", None, False), ("oracle", ORACLE, False), ("capped", ORACLE, True)]:
                runs = [await collect(engine, chat_ids(tok, q, system), SamplingParams(32, temperature=0, capping=capping))
                        for q in questions]
                out[name] = mean([mean(r[2]) for r in runs])
            return out
        m = asyncio.run(measure())
    assert m["oracle"] < m["plain"], m
    assert m["capped"] > m["oracle"], m


def test_cancel_frees_the_slot_within_a_step(smollm2, smollm2_axis):
    tok = smollm2.tokenizer
    with running_engine(smollm2, smollm2_axis) as engine:
        async def cancel_midway():
            request = await engine.submit(chat_ids(tok, "Tell me a very long story."),
                                          SamplingParams(500, temperature=0))
            seen, reasons, at_cancel = 0, [], None
            async for d in request.deltas():
                seen += len(d.token_ids)
                reasons.append(d.finish_reason)
                if seen >= 3 and not request.cancelled:
                    request.cancel()
                    at_cancel = len(request.row.generated_ids)  # read after the cancel: no step can slip in
            return request, at_cancel, reasons[-1]
        request, at_cancel, last = asyncio.run(cancel_midway())
        assert last == "cancelled"
        # The engine ends it before its next step: at most the step already running adds a token.
        assert len(request.row.generated_ids) - at_cancel <= 1
        assert engine.runner.rows == []
        assert engine.stat_logger.requests.labels(smollm2.name, "cancelled")._value.get() == 1


def test_queue_bound_raises_queue_full(smollm2, smollm2_axis):
    with running_engine(smollm2, smollm2_axis, start=False, max_batch_size=1, max_waiting=1) as engine:
        async def fill():
            ids = chat_ids(smollm2.tokenizer, "hi")
            await engine.submit(ids, SamplingParams(4))  # takes the free batch slot
            await engine.submit(ids, SamplingParams(4))  # waits
            with pytest.raises(QueueFull):
                await engine.submit(ids, SamplingParams(4))
        asyncio.run(fill())


def test_the_choices_of_one_request_queue_all_or_none(smollm2, smollm2_axis):
    with running_engine(smollm2, smollm2_axis, start=False, max_batch_size=2, max_waiting=2) as engine:
        async def fill():
            ids = chat_ids(smollm2.tokenizer, "hi")
            with pytest.raises(QueueFull):
                await engine.submit_all(ids, [SamplingParams(4)] * 5)
            assert len(engine.scheduler.waiting) == 0  # none of the five was queued
            assert len(await engine.submit_all(ids, [SamplingParams(4)] * 4)) == 4
        asyncio.run(fill())


def test_chunked_prefill_gives_the_same_tokens_and_interleaves_with_decoding(smollm2, smollm2_axis):
    tok = smollm2.tokenizer
    long_prompt = chat_ids(tok, "Summarise this: " + " ".join(f"item {i} is blue." for i in range(40)))
    assert len(long_prompt) > 16 * 10
    params = SamplingParams(12, temperature=0, capping=True)
    with running_engine(smollm2, smollm2_axis) as whole:
        reference = asyncio.run(collect(whole, long_prompt, params))
    with running_engine(smollm2, smollm2_axis, prefill_chunk_tokens=16) as sliced:
        async def staggered():
            short_tokens = []

            async def short():
                request = await sliced.submit(chat_ids(tok, "Count to one hundred."),
                                              SamplingParams(200, temperature=0))
                async for d in request.deltas():
                    short_tokens.extend(d.token_ids)

            running = asyncio.create_task(short())
            while len(short_tokens) < 2:
                await asyncio.sleep(0.01)
            long_request = await sliced.submit(long_prompt, params)
            at_submit = len(short_tokens)
            chunked, at_first_token = ("", [], [], None), None
            async for d in long_request.deltas():
                if at_first_token is None:
                    at_first_token = len(short_tokens)
                chunked = (chunked[0] + d.text, chunked[1] + d.token_ids, chunked[2] + d.projections, d.finish_reason)
            await running
            return chunked, at_first_token - at_submit
        chunked, decoded_during_prefill = asyncio.run(staggered())
    assert_same_generation(chunked, reference)
    # The running request kept decoding while the long prompt went in slices of 16 tokens.
    assert decoded_during_prefill >= len(long_prompt) // 16 - 2


# --- isolation: one request's failure is its own ---------------------------------------------

SIX = ["What is the capital of France?", "hi", "Name a colour.", "What is 2+2?", "Say yes.", "Name a fruit."]


def six_jobs(tok):
    return [(chat_ids(tok, p), SamplingParams(20, temperature=0, capping=i % 2 == 0)) for i, p in enumerate(SIX)]


async def wait_for(predicate, timeout=60.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def errors(engine):
    return engine.stat_logger.requests.labels(engine.stat_logger.model, "error")._value.get()


def test_a_request_that_breaks_its_prefill_fails_alone_while_six_streams_finish(smollm2, smollm2_axis):
    tok = smollm2.tokenizer
    jobs = six_jobs(tok)
    poison = chat_ids(tok, "hello") + [smollm2.vocab_size + 5]  # no embedding row: the forward raises
    with running_engine(smollm2, smollm2_axis) as engine:
        async def scenario():
            alone = [await collect(engine, ids, p) for ids, p in jobs]
            running = [asyncio.create_task(collect(engine, ids, p)) for ids, p in jobs]
            await wait_for(lambda: len(engine.runner.rows) == 6)
            poisoned = await collect(engine, poison, SamplingParams(8, temperature=0))
            return alone, await asyncio.gather(*running), poisoned
        alone, together, poisoned = asyncio.run(scenario())
        assert poisoned[3] == "error" and poisoned[1] == []
        assert errors(engine) == 1
    for t, a in zip(together, alone):
        assert t[3] in ("stop", "length")
        assert_same_generation(t, a)


def test_a_poisoned_member_of_a_prefill_group_is_found_and_the_others_are_served(smollm2, smollm2_axis):
    tok = smollm2.tokenizer
    jobs = six_jobs(tok)[:3]
    poison = (chat_ids(tok, "hello") + [smollm2.vocab_size], SamplingParams(8, temperature=0))
    with running_engine(smollm2, smollm2_axis) as engine:
        async def scenario():
            alone = [await collect(engine, ids, p) for ids, p in jobs]
            # Submitted in one go to an idle engine, the four are admitted as one prefill group.
            together = await asyncio.gather(*[collect(engine, ids, p) for ids, p in [jobs[0], poison, *jobs[1:]]])
            return alone, together
        alone, together = asyncio.run(scenario())
        assert errors(engine) == 1
    assert together[1][3] == "error"
    for t, a in zip([together[0], *together[2:]], alone):
        assert_same_generation(t, a)


def test_a_failed_decode_step_is_recovered_by_re_prefilling_every_row(smollm2, smollm2_axis):
    """A decode step fails once (as an out-of-memory would): nobody fails, nobody's tokens change."""
    from axiscap.steering.hooks import decoder_layers

    tok = smollm2.tokenizer
    jobs = six_jobs(tok)[:4]
    failures = []

    def fail_once_in_a_batched_decode(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if not failures and h.shape[0] >= 3 and h.shape[1] == 1:
            failures.append(h.shape)
            raise RuntimeError("injected failure in a decode step")

    with running_engine(smollm2, smollm2_axis) as engine:
        async def scenario():
            alone = [await collect(engine, ids, p) for ids, p in jobs]
            handle = decoder_layers(smollm2.model)[3].register_forward_hook(fail_once_in_a_batched_decode)
            try:
                together = await asyncio.gather(*[collect(engine, ids, p) for ids, p in jobs])
            finally:
                handle.remove()
            return alone, together
        alone, together = asyncio.run(scenario())
        assert failures and errors(engine) == 0
    for t, a in zip(together, alone):
        assert_same_generation(t, a)


def test_a_request_past_its_deadline_ends_with_timeout(smollm2, smollm2_axis):
    tok = smollm2.tokenizer
    with running_engine(smollm2, smollm2_axis) as engine:
        async def late():
            request = await engine.submit(chat_ids(tok, "Tell me a very long story."),
                                          SamplingParams(2000, temperature=0), timeout=0.5)
            tokens, last = 0, None
            async for d in request.deltas():
                tokens += len(d.token_ids)
                last = d.finish_reason
            return tokens, last
        tokens, last = asyncio.run(late())
        assert last == "timeout" and 0 < tokens < 2000
        assert engine.runner.rows == []


def test_admission_keeps_the_kv_slots_within_their_budget(smollm2, smollm2_axis):
    tok = smollm2.tokenizer
    jobs = six_jobs(tok)
    capacity = slot_capacity(max(len(ids) + p.max_tokens for ids, p in jobs))
    assert {slot_capacity(len(ids) + p.max_tokens) for ids, p in jobs} == {capacity}
    widest_prompt = max(len(ids) for ids, _ in jobs)
    # Slots double (1, 2, 4, 8): four slots and one prompt's prefill buffer fit, eight slots do not.
    budget = 4 * capacity + widest_prompt
    with running_engine(smollm2, smollm2_axis, kv_cache_tokens=budget) as engine:
        async def scenario():
            alone = [await collect(engine, ids, p) for ids, p in jobs]
            peak, most_allocated = 0, 0

            async def watch():
                nonlocal peak, most_allocated
                while True:
                    peak = max(peak, len(engine.runner.rows))
                    most_allocated = max(most_allocated, engine.runner.store.allocated_tokens())
                    await asyncio.sleep(0.002)

            watcher = asyncio.create_task(watch())
            together = await asyncio.gather(*[collect(engine, ids, p) for ids, p in jobs])
            watcher.cancel()
            return alone, together, peak, most_allocated
        alone, together, peak, most_allocated = asyncio.run(scenario())
        too_big = SamplingParams(budget, temperature=0)

        async def refuse_then_idle():
            with pytest.raises(DoesNotFit):
                await engine.submit(chat_ids(tok, "hi"), too_big)
            await wait_for(lambda: engine.runner.store.allocated_tokens() == 0)  # every class gave its memory back
        asyncio.run(refuse_then_idle())
    assert peak == 4
    assert most_allocated == 4 * capacity
    for t, a in zip(together, alone):
        assert_same_generation(t, a)


def test_a_long_request_does_not_widen_the_short_ones_kv(smollm2, smollm2_axis):
    """Each request holds its own size class: one long reservation and six short ones share a
    budget that a batch padded to the longest row (7 x 1,000 tokens) would need 3.9 times over."""
    tok = smollm2.tokenizer
    jobs = six_jobs(tok)
    long_ids = chat_ids(tok, "Tell me a very long story.")
    long_params = SamplingParams(1000 - len(long_ids), temperature=0)
    short = slot_capacity(max(len(ids) + p.max_tokens for ids, p in jobs))
    budget = slot_capacity(1000) + 8 * short + 6 * max(len(ids) for ids, _ in jobs)
    assert budget < 7 * 1000 / 3.9
    with running_engine(smollm2, smollm2_axis, kv_cache_tokens=budget) as engine:
        async def scenario():
            long_request = await engine.submit(long_ids, long_params)
            await wait_for(lambda: len(engine.runner.rows) == 1)
            peak = 0

            async def watch():
                nonlocal peak
                while True:
                    peak = max(peak, len(engine.runner.rows))
                    await asyncio.sleep(0.002)

            watcher = asyncio.create_task(watch())
            together = await asyncio.gather(*[collect(engine, ids, p) for ids, p in jobs])
            watcher.cancel()
            long_request.cancel()
            async for d in long_request.deltas():
                last = d.finish_reason
            return together, peak, last

        together, peak, long_end = asyncio.run(scenario())
    assert peak == 7 and long_end == "cancelled"
    assert all(t[3] in ("stop", "length") and t[1] for t in together)


def test_logprobs_match_a_plain_forward_through_sliced_prefills(smollm2, smollm2_axis):
    """Prompt logprobs are gathered slice by slice (14 columns here) for the row that asked, prefilled in
    a group of its own; generated logprobs come from decode steps. Both equal the log-softmax of one
    plain forward."""
    tok = smollm2.tokenizer
    asking = chat_ids(tok, "Name three rivers in Europe.")
    other = chat_ids(tok, "Tell me about lighthouses and the people who keep them.")
    params = SamplingParams(6, temperature=0, capping=False, logprobs=3, prompt_logprobs=2)
    with running_engine(smollm2, smollm2_axis, prefill_chunk_tokens=14) as engine:
        async def both():
            async def deltas(ids, p):
                return [d async for d in (await engine.submit(ids, p)).deltas()]
            return await asyncio.gather(deltas(asking, params),
                                        deltas(other, SamplingParams(6, temperature=0, capping=False)))
        deltas, plain = asyncio.run(both())
    assert all(d.logprobs is None and d.prompt_logprobs is None for d in plain)
    prompt_lp = deltas[0].prompt_logprobs
    generated = [lp for d in deltas for lp in d.logprobs]
    tokens = [t for d in deltas for t in d.token_ids]
    assert [lp.token_id for lp in generated] == tokens and len(tokens) == 6
    assert len(prompt_lp) == len(asking) and prompt_lp[0] is None
    assert [lp.token_id for lp in prompt_lp[1:]] == asking[1:]
    assert all(d.prompt_logprobs is None for d in deltas[1:])

    import torch
    with torch.inference_mode():  # the engine has stopped and removed its hooks
        reference = smollm2.model(torch.tensor([asking + tokens])).logits[0].float().log_softmax(-1)
    for position, lp in list(enumerate(prompt_lp))[1:] + list(enumerate(generated, start=len(asking))):
        row = reference[position - 1]
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=2e-3)
        top = row.topk(len(lp.top))
        assert [i for i, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=2e-3)
    assert all(len(lp.top) == 2 for lp in prompt_lp[1:]) and all(len(lp.top) == 3 for lp in generated)


def test_choices_share_one_computation_of_their_prompt_logprobs(smollm2, smollm2_axis, monkeypatch):
    """echo + logprobs with n choices: the first choice computes the prompt logprobs alone, in slices of at
    most PROMPT_LOGPROBS_SLICE_TOKENS positions (each runs the vocabulary-wide head); every other choice
    gets the same list, complete in its first delta, without computing it again."""
    from axiscap.server.engines.hf import runner as hf_runner

    slices = []
    compute = hf_runner.ModelRunner._prompt_logprobs

    def observed(self, group, logits, start, end):
        slices.append((len(group.requests), logits.shape[0] * logits.shape[1]))
        return compute(self, group, logits, start, end)

    monkeypatch.setattr(hf_runner.ModelRunner, "_prompt_logprobs", observed)
    prompt = chat_ids(smollm2.tokenizer, "Tell me about lighthouses and the people who keep them. " * 24)
    choices = [SamplingParams(3, temperature=0.7, seed=seed, prompt_logprobs=2) for seed in range(3)]
    with running_engine(smollm2, smollm2_axis) as engine:
        async def run():
            requests = await engine.submit_all(prompt, choices)
            return [[d async for d in r.deltas()] for r in requests]
        deltas = asyncio.run(run())
    first = [d[0].prompt_logprobs for d in deltas]
    assert len(first[0]) == len(prompt) > 2 * hf_runner.PROMPT_LOGPROBS_SLICE_TOKENS
    assert first[1] == first[0] and first[2] == first[0]
    assert all(rows == 1 and positions <= hf_runner.PROMPT_LOGPROBS_SLICE_TOKENS for rows, positions in slices)
    assert len(slices) == -(-len(prompt) // hf_runner.PROMPT_LOGPROBS_SLICE_TOKENS)


def test_a_forward_run_beside_the_engine_between_its_steps_is_not_capped(smollm2, smollm2_axis):
    """An axis tool teacher-forces answers on the model the engine generates with: the engine's hooks
    must not apply its last step's mask (another batch's rows) to that forward."""
    import torch

    ids = torch.tensor([chat_ids(smollm2.tokenizer, "Will I be happy?", system=ORACLE)])
    with running_engine(smollm2, smollm2_axis) as engine:
        asyncio.run(collect(engine, ids[0].tolist(), SamplingParams(4, temperature=0, capping=True)))
        with torch.inference_mode():
            beside = smollm2.model(input_ids=ids).logits
            two_rows = smollm2.model(input_ids=ids.expand(2, -1)).logits  # another shape than the step's
    with torch.inference_mode():
        plain = smollm2.model(input_ids=ids).logits  # the engine stopped: its hooks are gone
    assert torch.equal(beside, plain)
    torch.testing.assert_close(two_rows[1:], plain, rtol=1e-4, atol=1e-4)  # batch 2: another kernel shape
