"""Gated capping (``capping: "auto"``): uncapped until the prompt or a generated token shows drift."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import httpx
import pytest
import torch

from axiscap.server.chat_template import render_chat
from axiscap.server.engines import SamplingParams
from axiscap.steering import AssistantAxis, AxisHooks
from axiscap.steering.gate import GATE_KEY, GATED_ROLES, CapGate, gate_threshold

from .conftest import SHIPPED_AXIS, assert_openai_error, server
from .test_engine import ORACLE, collect, running_engine

MODEL = "smollm2-135m-instruct"
NEVER = float("-inf")  # a threshold no projection falls below
STORY = [{"role": "user", "content": "Tell me a story about a lighthouse keeper and a storm."}]
ORACLE_CHAT = [{"role": "system", "content": ORACLE}, {"role": "user", "content": "Will I be happy?"}]


def test_the_gate_reads_message_means_and_single_tokens():
    gate = CapGate(spans=((0, 2), (4, 6), (6, 6)), gate=10.0, tau=5.0)
    assert not gate.prompt_drifted([11.0, 9.5, 0.0, 0.0, 20.0, 0.1])  # means 10.25 and 10.05; user tokens ignored
    assert gate.prompt_drifted([11.0, 9.5, 0.0, 0.0, 12.0, 7.0])  # the second message's mean is 9.5
    assert gate.token_drifted(4.9) and not gate.token_drifted(5.0) and not gate.token_drifted(None)
    axis = AssistantAxis(axis=torch.ones(4, 8), cap_layers=[2, 3], cap_thresholds=[1.5, 2.5], monitor_layer=3,
                         model="m", percentile=25.0, n_samples=1)
    assert gate_threshold(axis) == 2.5  # no calibrated threshold: tau at the monitor layer
    axis.extra[GATE_KEY] = "1.25"
    assert gate_threshold(axis) == 1.25


def reference_greedy(loaded, axis, ids: list[int], n: int, cap_from_position: int | None) -> list[int]:
    """Greedy tokens from whole forwards (no KV cache), capping every position from the one given."""
    hooks = AxisHooks(loaded.model, axis)
    try:
        context = list(ids)
        with torch.no_grad():
            for _ in range(n):
                mask = None
                if cap_from_position is not None:
                    mask = (torch.arange(len(context)) >= cap_from_position)[None, :]
                hooks.set_cap_mask(mask)
                logits = loaded.model(input_ids=torch.tensor([context])).logits[0, -1]
                context.append(int(logits.argmax()))
        return context[len(ids):]
    finally:
        hooks.remove()


def gated(spans=(), gate=NEVER, tau=NEVER, n=24) -> SamplingParams:
    return SamplingParams(n, temperature=0, capping=False, gate=CapGate(tuple(spans), gate, tau), ignore_eos=True)


def first_new_low(projections: list[float], after: int) -> int:
    """The first index past ``after`` whose projection lies below every one before it."""
    for i in range(after, len(projections)):
        if projections[i] < min(projections[:i]):
            return i
    raise AssertionError(f"no new low in {projections}")


def test_a_token_below_tau_caps_the_rest_and_leaves_the_other_rows_alone(smollm2, smollm2_axis):
    tok = smollm2.tokenizer
    story = render_chat(tok, STORY).ids
    oracle = render_chat(tok, ORACLE_CHAT).ids
    plain = SamplingParams(24, temperature=0, capping=False, ignore_eos=True)
    capped = SamplingParams(24, temperature=0, capping=True, ignore_eos=True)
    with running_engine(smollm2, smollm2_axis) as engine:
        uncapped = asyncio.run(collect(engine, story, plain))
        # tau between the uncapped answer's running low and its next new low, at token k: the gate
        # switches there and the tokens after k are generated capped.
        k = first_new_low(uncapped[2], after=3)
        tau = (uncapped[2][k] + min(uncapped[2][:k])) / 2
        params = gated(tau=tau)

        async def mixed():
            deltas = []

            async def watch():
                request = await engine.submit(story, params)
                async for d in request.deltas():
                    deltas.append(d)

            others = [collect(engine, oracle, plain), collect(engine, oracle, capped), collect(engine, story, plain)]
            together = await asyncio.gather(watch(), *others)
            alone = [await collect(engine, oracle, plain), await collect(engine, oracle, capped)]
            return deltas, together[1:], alone

        deltas, together, alone = asyncio.run(mixed())
    tokens = [t for d in deltas for t in d.token_ids]
    switched = [d.capping_from for d in deltas if d.capping_from is not None]
    assert switched == [k + 1]  # reported once, in the delta that holds the first capped token
    assert tokens[:k + 1] == uncapped[1][:k + 1]
    assert tokens != uncapped[1]  # capping changed what came after
    # The token made at position len(story) + k (it feeds token k) is the first one capped.
    assert tokens == reference_greedy(smollm2, smollm2_axis, story, 24, len(story) + k)
    # Rows beside it in the batch: as alone, and the uncapped story is unchanged by its neighbour's switch.
    for t, a in zip(together[:2], alone):
        assert t[1] == a[1]
    assert together[2][1] == uncapped[1]


def test_a_drifted_prompt_is_capped_from_its_first_token_like_capping_on(smollm2, smollm2_axis):
    tok = smollm2.tokenizer
    prompt = render_chat(tok, ORACLE_CHAT)
    watched = [(s.start, s.end) for s in prompt.spans if s.role in GATED_ROLES]
    assert len(watched) == 1  # the system message
    with running_engine(smollm2, smollm2_axis) as engine:
        async def run():
            always = await collect(engine, prompt.ids, SamplingParams(24, temperature=0, ignore_eos=True))
            off = await collect(engine, prompt.ids, SamplingParams(24, temperature=0, capping=False, ignore_eos=True))
            request = await engine.submit(prompt.ids, asking_prompt_projections(gated(watched, gate=float("inf"))))
            deltas = [d async for d in request.deltas()]
            calm = await collect(engine, prompt.ids, gated(watched, gate=NEVER))
            return always, off, deltas, calm

        always, off, deltas, calm = asyncio.run(run())
    assert always[1] != off[1]
    assert [t for d in deltas for t in d.token_ids] == always[1]  # prefilled again, capped, from the prompt on
    assert deltas[0].capping_from == 0
    # The prompt's projections it reports are those the gate judged: of the uncapped prefill.
    assert deltas[0].prompt_projections is not None and len(deltas[0].prompt_projections) == len(prompt.ids)
    assert calm[1] == off[1]  # a gate that never trips: the uncapped answer


def asking_prompt_projections(params: SamplingParams) -> SamplingParams:
    return dataclasses.replace(params, prompt_projections="all")


def test_auto_over_http_says_where_capping_began(smollm2, smollm2_axis):
    # An axis whose gate every message falls below: a gated request is the capped one, from the prompt on.
    axis = dataclasses.replace(smollm2_axis, extra={**smollm2_axis.extra, GATE_KEY: "1e9"})
    with server(smollm2, axis, default_max_tokens=24) as live:
        url = live.base_url + "/v1/chat/completions"
        body = {"model": MODEL, "messages": ORACLE_CHAT, "temperature": 0, "max_tokens": 24}
        on = httpx.post(url, json={**body, "capping": True}, timeout=120).json()
        auto = httpx.post(url, json={**body, "capping": "auto"}, timeout=120).json()
        assert auto["capping"] == "auto"
        assert auto["choices"][0]["capping_from"] == 0
        assert auto["choices"][0]["message"]["content"] == on["choices"][0]["message"]["content"]
        assert "capping_from" not in on["choices"][0]
        chunks = []
        with httpx.stream("POST", url, json={**body, "capping": "auto", "stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
        assert [c["choices"][0].get("capping_from") for c in chunks if c["choices"]].count(0) == 1
        assert all(c["capping"] == "auto" for c in chunks)
        bad = httpx.post(url, json={**body, "capping": "sometimes"}, timeout=30)
        assert_openai_error(bad, 400, "capping")


def test_the_gated_policy_overrides_the_clients_switch(smollm2, smollm2_axis):
    with server(smollm2, smollm2_axis, capping_policy="gated") as live:
        body = {"model": MODEL, "messages": STORY, "max_tokens": 4, "capping": False}
        reply = httpx.post(live.base_url + "/v1/chat/completions", json=body, timeout=120).json()
        assert reply["capping"] == "auto" and reply["capping_overridden"] is True


def test_the_vllm_backend_refuses_the_gated_policy_at_start():
    from axiscap.server.config import Settings
    from axiscap.server.state import build_vllm_state

    with pytest.raises(RuntimeError, match="gated runs on the transformers backend only"):
        build_vllm_state(Settings(backend="vllm", capping_policy="gated"), SHIPPED_AXIS)
