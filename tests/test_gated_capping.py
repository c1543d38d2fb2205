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
from axiscap.steering import AssistantAxis, AxisFileError, AxisHooks, load_axis, save_axis
from axiscap.steering.gate import (DETECTOR_KEY, GATE_KEY, GATED_CAP_KEY, GATED_ROLES, CapGate, TokenDetector,
                                   Trip, gate_for, gate_threshold)

from .conftest import SHIPPED_AXIS, assert_openai_error, server
from .metrics_mix import scrape
from .test_engine import ORACLE, collect, running_engine

MODEL = "smollm2-135m-instruct"
NEVER = float("-inf")  # a threshold no projection falls below
STORY = [{"role": "user", "content": "Tell me a story about a lighthouse keeper and a storm."}]
ORACLE_CHAT = [{"role": "system", "content": ORACLE}, {"role": "user", "content": "Will I be happy?"}]


def test_the_prompt_gate_reads_message_means():
    gate = CapGate(spans=((0, 2), (4, 6), (6, 6)), gate=10.0, detector=TokenDetector(5.0), action="flag")
    assert gate.prompt_trip([11.0, 9.5, 0.0, 0.0, 20.0, 0.1]) is None  # means 10.25 and 10.05; user tokens ignored
    # The second message's mean is 9.5: tripped before the first token, with the lowest mean as its statistic.
    assert gate.prompt_trip([11.0, 9.5, 0.0, 0.0, 12.0, 7.0]) == Trip("prompt", 0, 9.5, "flag")


def ewma_trip(projections, threshold, lam, warmup):
    """The detector written out: z_1 = p_1, z_k = lam p_k + (1 - lam) z_(k-1); the first k > warmup with z_k < threshold."""
    z = None
    for k, p in enumerate(projections, start=1):
        z = p if z is None else lam * p + (1 - lam) * z
        if k > warmup and z < threshold:
            return k - 1, z
    return None


def test_the_token_detector_is_an_ewma_tested_after_its_warmup():
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        projections = (torch.randn(40, generator=generator) * 5 + 10).tolist()
        lam, warmup, threshold = [0.1, 0.3, 1.0][trial % 3], trial % 6, 6.0 + trial % 5
        got = TokenDetector(threshold, lam, warmup).first_trip(projections)
        want = ewma_trip(projections, threshold, lam, warmup)
        assert (got is None) == (want is None) and (got is None or (got[0] == want[0] and abs(got[1] - want[1]) < 1e-9))
    # One low token among ordinary ones trips a per-token test (lam 1), not the EWMA.
    answer = [20.0] * 10 + [-5.0] + [20.0] * 10
    assert TokenDetector(0.0, 1.0, 0).first_trip(answer) == (10, -5.0)
    assert TokenDetector(0.0, 0.2, 4).first_trip(answer) is None
    # The first tokens are exempt: a low start trips only once the warmup is over.
    assert TokenDetector(0.0, 1.0, 3).first_trip([-1.0] * 5) == (3, -1.0)


def test_an_axis_file_without_a_detector_gets_the_stated_default():
    axis = AssistantAxis(axis=torch.ones(4, 8), cap_layers=[2, 3], cap_thresholds=[1.5, 2.5], monitor_layer=3,
                         model="m", percentile=25.0, n_samples=1)
    assert gate_threshold(axis) == 2.5  # no calibrated threshold: tau at the monitor layer
    assert gate_for(axis, ()).detector == TokenDetector(2.5, 0.2, 4)
    axis.extra[GATE_KEY] = "1.25"
    axis.extra[DETECTOR_KEY] = json.dumps({"threshold": 7.5, "ewma_lambda": 0.1, "warmup": 2, "n_answers": 228})
    gate = gate_for(axis, ((0, 3),), "stop")
    assert (gate.gate, gate.detector, gate.action) == (1.25, TokenDetector(7.5, 0.1, 2), "stop")


def without_gated_cap(axis: AssistantAxis) -> AssistantAxis:
    """The axis as a file without a gated cap: a tripped request gets the always-on cap, which the
    tests of where and when capping switches on compare against."""
    return dataclasses.replace(axis, extra={k: v for k, v in axis.extra.items() if k != GATED_CAP_KEY})


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


def gated(spans=(), gate=NEVER, tau=NEVER, n=24, action="cap") -> SamplingParams:
    """A gated request whose detector is the per-token rule (lam 1, no warmup): it trips at the first token below tau."""
    return SamplingParams(n, temperature=0, capping=False, ignore_eos=True,
                          gate=CapGate(tuple(spans), gate, TokenDetector(tau, 1.0, 0), action))


def first_new_low(projections: list[float], after: int) -> int:
    """The first index past ``after`` whose projection lies below every one before it."""
    for i in range(after, len(projections)):
        if projections[i] < min(projections[:i]):
            return i
    raise AssertionError(f"no new low in {projections}")


PLAIN = SamplingParams(24, temperature=0, capping=False, ignore_eos=True)
CAPPED = SamplingParams(24, temperature=0, capping=True, ignore_eos=True)


def tripping_at_a_new_low(engine, ids: list[int]) -> tuple[tuple, int, float]:
    """The uncapped answer, a token k, and a tau between the answer's running low and its next new
    low, at k: a per-token gate with that tau switches at k and generates the tokens after it capped."""
    uncapped = asyncio.run(collect(engine, ids, PLAIN))
    k = first_new_low(uncapped[2], after=3)
    return uncapped, k, (uncapped[2][k] + min(uncapped[2][:k])) / 2


def test_a_token_below_tau_caps_the_rest_and_leaves_the_other_rows_alone(smollm2, smollm2_axis):
    smollm2_axis = without_gated_cap(smollm2_axis)
    tok = smollm2.tokenizer
    story = render_chat(tok, STORY).ids
    oracle = render_chat(tok, ORACLE_CHAT).ids
    with running_engine(smollm2, smollm2_axis) as engine:
        uncapped, k, tau = tripping_at_a_new_low(engine, story)
        params = gated(tau=tau)

        async def mixed():
            deltas = []

            async def watch():
                request = await engine.submit(story, params)
                async for d in request.deltas():
                    deltas.append(d)

            others = [collect(engine, oracle, PLAIN), collect(engine, oracle, CAPPED), collect(engine, story, PLAIN)]
            together = await asyncio.gather(watch(), *others)
            alone = [await collect(engine, oracle, PLAIN), await collect(engine, oracle, CAPPED)]
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
    smollm2_axis = without_gated_cap(smollm2_axis)
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


def with_gated_cap(axis: AssistantAxis, lift: float) -> tuple[AssistantAxis, AssistantAxis]:
    """The axis with gated thresholds ``lift`` above its own, and the always-on axis capping at those."""
    stronger = [t + lift for t in axis.cap_thresholds]
    gated_axis = dataclasses.replace(axis, extra={**axis.extra, GATED_CAP_KEY: ",".join(map(repr, stronger))})
    return gated_axis, without_gated_cap(dataclasses.replace(axis, cap_thresholds=stronger))


def test_a_tripped_request_gets_the_gated_cap_and_its_neighbours_keep_theirs(smollm2, smollm2_axis):
    tok = smollm2.tokenizer
    story = render_chat(tok, STORY).ids
    prompt = render_chat(tok, ORACLE_CHAT)
    watched = [(s.start, s.end) for s in prompt.spans if s.role in GATED_ROLES]
    gated_axis, strong_axis = with_gated_cap(smollm2_axis, 15.0)
    with running_engine(smollm2, gated_axis) as engine:
        uncapped, k, tau = tripping_at_a_new_low(engine, story)

        async def mixed():
            return await asyncio.gather(collect(engine, story, gated(tau=tau)), collect(engine, story, CAPPED),
                                        collect(engine, prompt.ids, gated(watched, gate=float("inf"))),
                                        collect(engine, story, PLAIN))

        tripped, always, drifted_prompt, off = asyncio.run(mixed())
    # Tripped at token k: from there the gated thresholds, not the always-on ones.
    assert tripped[1] == reference_greedy(smollm2, strong_axis, story, 24, len(story) + k)
    assert tripped[1] != reference_greedy(smollm2, smollm2_axis, story, 24, len(story) + k)  # the two caps differ
    # A prompt that tripped the gate is prefilled again under the gated cap.
    assert drifted_prompt[1] == reference_greedy(smollm2, strong_axis, prompt.ids, 24, 0)
    # Beside them in the batch: capping on keeps the always-on cap, capping off stays uncapped.
    assert always[1] == reference_greedy(smollm2, smollm2_axis, story, 24, 0)
    assert off[1] == uncapped[1]


def test_gated_thresholds_need_one_finite_tau_per_capped_layer(tmp_path):
    axis = AssistantAxis(axis=torch.ones(4, 8), cap_layers=[2, 3], cap_thresholds=[1.5, 2.5], monitor_layer=3,
                         model="m", percentile=25.0, n_samples=1, extra={"gated_cap_thresholds": "4.0"})
    with pytest.raises(AxisFileError, match=r"'gated_cap_thresholds' needs one finite tau per capped layer \(2\)"):
        axis.validate()
    axis.extra["gated_cap_thresholds"] = "4.0,5.5"
    save_axis(axis, tmp_path / "a.safetensors")
    assert load_axis(tmp_path / "a.safetensors").gated_cap_thresholds == [4.0, 5.5]


def test_drift_actions_flag_leaves_the_answer_and_stop_ends_it_with_content_filter(smollm2, smollm2_axis):
    tok = smollm2.tokenizer
    story = render_chat(tok, STORY).ids
    prompt = render_chat(tok, ORACLE_CHAT)
    watched = [(s.start, s.end) for s in prompt.spans if s.role in GATED_ROLES]
    plain = SamplingParams(24, temperature=0, capping=False, ignore_eos=True)
    with running_engine(smollm2, smollm2_axis) as engine:
        uncapped = asyncio.run(collect(engine, story, plain))
        k = first_new_low(uncapped[2], after=3)
        tau = (uncapped[2][k] + min(uncapped[2][:k])) / 2  # the per-token detector trips at token k

        async def deltas_of(ids, params):
            request = await engine.submit(ids, params)
            return [d async for d in request.deltas()]

        async def run():
            return await asyncio.gather(deltas_of(story, gated(tau=tau, action="flag")),
                                        deltas_of(story, gated(tau=tau, action="stop")),
                                        deltas_of(prompt.ids, gated(watched, gate=float("inf"), action="stop")),
                                        collect(engine, story, plain))

        flagged, stopped, stopped_at_prompt, beside = asyncio.run(run())
    trips = [d.drift for d in flagged if d.drift is not None]
    assert len(trips) == 1 and (trips[0].source, trips[0].at, trips[0].action) == ("generation", k + 1, "flag")
    assert trips[0].statistic == pytest.approx(uncapped[2][k], abs=1e-3)  # lam 1: the EWMA is the token itself
    assert [t for d in flagged for t in d.token_ids] == uncapped[1]  # flagged, never capped
    assert all(d.capping_from is None for d in flagged)
    # stop: the answer ends with the token that tripped, as content_filter.
    assert [t for d in stopped for t in d.token_ids] == uncapped[1][:k + 1]
    assert stopped[-1].finish_reason == "content_filter" and stopped[-1].drift.at == k + 1
    # A prompt that trips under stop ends before any token.
    assert [t for d in stopped_at_prompt for t in d.token_ids] == []
    (end,) = stopped_at_prompt
    assert end.finish_reason == "content_filter" and (end.drift.source, end.drift.at) == ("prompt", 0)
    assert beside[1] == uncapped[1]  # the row beside them is untouched


def test_the_engine_trips_where_the_detector_over_its_own_projections_says(smollm2, smollm2_axis):
    story = render_chat(smollm2.tokenizer, STORY).ids
    lam, warmup = 0.3, 2
    with running_engine(smollm2, smollm2_axis) as engine:
        uncapped = asyncio.run(collect(engine, story, SamplingParams(24, temperature=0, capping=False,
                                                                     ignore_eos=True)))
        ewma, z = [], None
        for p in uncapped[2]:
            z = p if z is None else lam * p + (1 - lam) * z
            ewma.append(z)
        k = min(range(warmup, len(ewma)), key=ewma.__getitem__)  # the lowest EWMA after the warm-up
        before = min(ewma[warmup:k], default=ewma[k] + 1.0)
        detector = TokenDetector((ewma[k] + before) / 2, lam, warmup)
        expected = detector.first_trip(uncapped[2])
        assert expected is not None and expected[0] == k

        async def flagged():
            params = SamplingParams(24, temperature=0, capping=False, ignore_eos=True,
                                    gate=CapGate((), NEVER, detector, "flag"))
            request = await engine.submit(story, params)
            return [d async for d in request.deltas()]

        deltas = asyncio.run(flagged())
    (trip,) = [d.drift for d in deltas if d.drift is not None]
    assert (trip.source, trip.at) == ("generation", k + 1)
    assert trip.statistic == pytest.approx(expected[1], abs=1e-3)


def asking_prompt_projections(params: SamplingParams) -> SamplingParams:
    return dataclasses.replace(params, prompt_projections="all")


def test_auto_over_http_says_where_capping_began(smollm2, smollm2_axis):
    # An axis whose gate every message falls below: a gated request is the capped one, from the prompt on.
    axis = without_gated_cap(dataclasses.replace(smollm2_axis, extra={**smollm2_axis.extra, GATE_KEY: "1e9"}))
    with server(smollm2, axis, default_max_tokens=24) as live:
        url = live.base_url + "/v1/chat/completions"
        body = {"model": MODEL, "messages": ORACLE_CHAT, "temperature": 0, "max_tokens": 24}
        on = httpx.post(url, json={**body, "capping": True}, timeout=120).json()
        auto = httpx.post(url, json={**body, "capping": "auto"}, timeout=120).json()
        assert auto["capping"] == "auto"
        assert auto["choices"][0]["capping_from"] == 0
        drift = auto["choices"][0]["drift"]
        assert (drift["tripped"], drift["source"], drift["at"], drift["action"]) == (True, "prompt", 0, "cap")
        assert drift["statistic"] < 1e9  # the system message's mean, below the gate
        assert auto["choices"][0]["message"]["content"] == on["choices"][0]["message"]["content"]
        assert "capping_from" not in on["choices"][0] and "drift" not in on["choices"][0]
        chunks = []
        with httpx.stream("POST", url, json={**body, "capping": "auto", "stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
        assert [c["choices"][0].get("capping_from") for c in chunks if c["choices"]].count(0) == 1
        assert [c["choices"][0]["drift"]["source"] for c in chunks if "drift" in c["choices"][0]] == ["prompt"]
        assert all(c["capping"] == "auto" for c in chunks)
        bad = httpx.post(url, json={**body, "capping": "sometimes"}, timeout=30)
        assert_openai_error(bad, 400, "capping")


def test_a_trip_is_counted_logged_with_the_request_id_and_its_statistic_withheld_without_projections(
        smollm2, smollm2_axis, caplog):
    axis = dataclasses.replace(smollm2_axis, extra={**smollm2_axis.extra, GATE_KEY: "1e9"})
    calm = {"model": MODEL, "messages": STORY, "temperature": 0, "max_tokens": 8, "capping": "auto"}
    never = {GATE_KEY: "-1e9", DETECTOR_KEY: json.dumps({"threshold": -1e9, "ewma_lambda": 0.2, "warmup": 4})}
    with server(smollm2, dataclasses.replace(axis, extra={**smollm2_axis.extra, **never}),
                drift_action="flag") as live:  # a gate nothing trips: each choice says so at its end
        reply = httpx.post(live.base_url + "/v1/chat/completions", json={**calm, "n": 2}, timeout=120).json()
        assert [c["drift"] for c in reply["choices"]] == [{"tripped": False}] * 2
    with server(smollm2, axis, drift_action="flag", allow_projections=False) as live:
        url = live.base_url + "/v1/chat/completions"
        body = {"model": MODEL, "messages": ORACLE_CHAT, "temperature": 0, "max_tokens": 8, "capping": "auto"}
        before = scrape(live.base_url)
        with caplog.at_level("INFO", logger="axiscap.drift"):
            r = httpx.post(url, json=body, headers={"X-Request-Id": "client-req-17"}, timeout=120)
        assert r.headers["x-request-id"] == "client-req-17"
        drift = r.json()["choices"][0]["drift"]
        assert drift == {"tripped": True, "source": "prompt", "at": 0, "action": "flag"}  # no statistic
        assert "capping_from" not in r.json()["choices"][0]  # flagged: uncapped
        after = scrape(live.base_url)
        key = ("axiscap_drift_detections_total", (("action", "flag"), ("model", MODEL), ("source", "prompt")))
        assert after[key] == before[key] + 1
        lines = [rec.getMessage() for rec in caplog.records if rec.name == "axiscap.drift"]
        assert len(lines) == 1 and "request_id=client-req-17" in lines[0] and "source=prompt" in lines[0]
        assert ORACLE[:20] not in lines[0]
        # Without the header, the server makes an id and echoes it.
        made = httpx.post(url, json={**body, "capping": True}, timeout=120).headers["x-request-id"]
        assert len(made) == 32 and made != "client-req-17"


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
