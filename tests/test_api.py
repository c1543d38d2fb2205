"""The HTTP API on a real uvicorn server on loopback, with the real SmolLM2, via httpx and the openai SDK."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import psutil
import pytest

from .metrics_mix import scrape

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0)


def sample(samples, name, **labels):
    return samples.get((name, tuple(sorted({"model": MODEL, **labels}.items()))), 0.0)


def test_models_and_health(client, live_server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model" and models.data[0].owned_by == "axiscap"
    health = httpx.get(live_server.base_url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL and health["cap_layers"]


def test_chat_non_stream_and_stream_agree(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=20)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    assert "Paris" in full.choices[0].message.content
    assert full.choices[0].finish_reason == "stop"
    assert full.usage.completion_tokens > 0 and full.usage.prompt_tokens > 10
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert full.to_dict()["capping"] is True  # the server default

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == full.choices[0].message.content


def test_capping_switch_and_projections_through_extra_body(client):
    messages = [{"role": "system", "content": "You are an ancient oracle who speaks in cryptic prophecies."},
                {"role": "user", "content": "Will I be happy?"}]
    off = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24,
                                         extra_body={"capping": False, "return_projections": True})
    on = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24,
                                        extra_body={"capping": True, "return_projections": True})
    off_d, on_d = off.to_dict(), on.to_dict()
    assert off_d["capping"] is False and on_d["capping"] is True
    p_off, p_on = off_d["choices"][0]["axis_projections"], on_d["choices"][0]["axis_projections"]
    assert len(p_off) == off.usage.completion_tokens and len(p_on) == on.usage.completion_tokens
    assert sum(p_on) / len(p_on) > sum(p_off) / len(p_off)

    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24,
                                            stream=True, extra_body={"capping": False, "return_projections": True})
    streamed = [p for c in stream for p in c.to_dict()["choices"][0]["axis_projections"]]
    assert streamed == pytest.approx(p_off, rel=1e-4, abs=1e-3)


def test_completions_endpoint_length_stop_and_seed(client):
    full = client.completions.create(model=MODEL, prompt="The three primary colours are", max_tokens=7,
                                     temperature=0)
    assert full.object == "text_completion"
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 7
    chunks = list(client.completions.create(model=MODEL, prompt="The three primary colours are", max_tokens=7,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"

    counted = client.completions.create(model=MODEL, prompt="One, two, three, four,", max_tokens=30,
                                        temperature=0, stop=[" six"])
    assert counted.choices[0].finish_reason == "stop"
    assert "six" not in counted.choices[0].text and "five" in counted.choices[0].text

    runs = [client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                      seed=42).choices[0].text for _ in range(2)]
    assert runs[0] == runs[1]


def test_raw_sse_framing(live_server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", live_server.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    last = json.loads(data[-2])
    assert last["choices"][0]["finish_reason"] == "length" and "usage" not in last


BAD_REQUESTS = [
    ("malformed json", b'{"model": "x", "messages": [', 400, None),
    ("not an object", b'[1, 2]', 400, None),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("missing model", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("empty messages", {"model": MODEL, "messages": []}, 400, "messages"),
    ("messages not a list", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("bad role", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("negative max_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
     400, "max_tokens"),
    ("huge max_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9},
     400, "max_tokens"),
    ("string max_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"},
     400, "max_tokens"),
    ("temperature type", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
     400, "temperature"),
    ("temperature range", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 3},
     400, "temperature"),
    ("capping type", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "capping": "yes"},
     400, "capping"),
    ("n over the server's bound", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 1000},
     400, "n"),
    ("top_logprobs without logprobs", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                       "top_logprobs": 2}, 400, None),
    ("top_logprobs over 20", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, 400, "top_logprobs"),
    ("logit_bias key", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"a": 1}},
     400, "logit_bias"),
    ("logit_bias token", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                          "logit_bias": {"999999": 1}}, 400, "logit_bias"),
    ("logit_bias value", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                          "logit_bias": {"5": 101}}, 400, "logit_bias.5"),
    ("min_tokens over max_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                    "max_tokens": 2, "min_tokens": 3}, 400, "min_tokens"),
    ("presence_penalty range", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("response_format type", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "yaml"}}, 400, "response_format.type"),
    ("json_schema missing", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                             "response_format": {"type": "json_schema"}}, 400, "response_format"),
    ("json_schema unusable", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_schema", "json_schema": {
                                  "name": "x", "schema": {"properties": {"a": {"$ref": "#/nowhere"}}}}}},
     400, "response_format"),
    ("too many stops", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")},
     400, "stop"),
]


@pytest.mark.parametrize("name, body, status, param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(live_server, name, body, status, param):
    url = live_server.base_url + "/v1/chat/completions"
    r = httpx.post(url, content=body, headers={"content-type": "application/json"}) if isinstance(body, bytes) \
        else httpx.post(url, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    ok = httpx.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200


def test_bad_completion_prompts(live_server):
    url = live_server.base_url + "/v1/completions"
    for prompt in ["", [], [10**7], ["a", "b"]]:
        r = httpx.post(url, json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
        assert r.status_code == 400, (prompt, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_sdk_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=0)
    missing = httpx.get(str(client.base_url) + "nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["message"]


def test_concurrent_streams_each_get_their_own_answer(live_server, client):
    prompts = ["What is the capital of France?", "hi", "Name a colour.", "What is 2+2?", "Say yes.", "Name a fruit."]
    alone = [client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}], temperature=0,
                                            max_tokens=16, extra_body={"capping": i % 2 == 0})
             .choices[0].message.content for i, p in enumerate(prompts)]

    async def stream_one(http, i, prompt):
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": 16, "stream": True, "capping": i % 2 == 0}
        text = ""
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["delta"].get("content", "")
        return text

    async def run_all():
        async with httpx.AsyncClient(base_url=live_server.base_url, timeout=120) as http:
            return await asyncio.gather(*[stream_one(http, i, p) for i, p in enumerate(prompts)])

    assert asyncio.run(run_all()) == alone


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_client_disconnect_stops_generation(live_server):
    engine = live_server.state.engine
    before = sample(scrape(live_server.base_url), "axiscap_requests_total", finish_reason="cancelled")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.stream("POST", live_server.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert sum(1 for _, line in zip(range(6), lines) if line.startswith("data: ")) >= 2
        assert len(engine.runner.rows) == 1
    assert wait_until(lambda: not engine.runner.rows), "generation kept running after the client left"
    after = sample(scrape(live_server.base_url), "axiscap_requests_total", finish_reason="cancelled")
    assert after == before + 1

    # A non-streaming client that gives up is noticed too. ignore_eos: the answer runs its 1000 tokens
    # (half a minute here) unless the server ends it, so an answer that simply finished cannot pass.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live_server.base_url + "/v1/chat/completions", json={**body, "stream": False, "ignore_eos": True},
                   timeout=1.0)
    assert wait_until(lambda: not engine.runner.rows), "non-stream generation kept running after the client left"
    assert sample(scrape(live_server.base_url), "axiscap_requests_total", finish_reason="cancelled") == after + 1


def noting_the_event_loop(function, on_loop: list[bool]):
    """``function``, noting in ``on_loop`` for each call whether it ran on an event loop's thread."""
    def noted(*args):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return function(*args)
    return noted


def test_a_schema_is_compiled_in_a_worker_process(live_server):
    # A large schema takes xgrammar seconds; on the event loop (or the engine's cores) it would stall
    # every stream. The compile runs in a process of the compile pool, at a lower priority.
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Name a city as JSON."}], "max_tokens": 24,
            "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}}
    before = sample(scrape(live_server.base_url), "axiscap_grammar_compile_seconds_count", outcome="ok")
    response = httpx.post(live_server.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert "city" in json.loads(response.json()["choices"][0]["message"]["content"])
    assert sample(scrape(live_server.base_url), "axiscap_grammar_compile_seconds_count", outcome="ok") == before + 1
    (worker,) = live_server.state.engine.grammars._pool._workers
    assert psutil.Process(worker._process.pid).nice() > psutil.Process().nice()


def test_queue_bound_answers_429_with_retry_after(live_server):
    # The fixture allows 8 running and 4 waiting.
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 40,
            "temperature": 0}

    async def flood():
        async with httpx.AsyncClient(base_url=live_server.base_url, timeout=120) as http:
            return await asyncio.gather(*[http.post("/v1/chat/completions", json=body) for _ in range(16)])

    responses = asyncio.run(flood())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 12 and codes.count(429) >= 1, codes
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.headers["retry-after"] == "1"
    assert limited.json()["error"]["type"] == "rate_limit_error"


def test_metrics_move_after_requests(live_server, client):
    before = scrape(live_server.base_url)
    messages = [{"role": "system", "content": "You are an ancient oracle who speaks in cryptic prophecies."},
                {"role": "user", "content": "Will I be happy?"}]
    results = {}
    for capping in (True, False):
        results[capping] = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12,
                                                          extra_body={"capping": capping})
    after = scrape(live_server.base_url)
    for capping, label in [(True, "on"), (False, "off")]:
        grew = sample(after, "axiscap_axis_projection_count", capping=label) - \
            sample(before, "axiscap_axis_projection_count", capping=label)
        assert grew == results[capping].usage.completion_tokens
        assert sample(after, "axiscap_generation_tokens_total", capping=label) - \
            sample(before, "axiscap_generation_tokens_total", capping=label) == grew
    below = sample(after, "axiscap_tokens_below_threshold_total", capping="off") - \
        sample(before, "axiscap_tokens_below_threshold_total", capping="off")
    assert 0 < below <= results[False].usage.completion_tokens  # the uncapped oracle drifts under tau
    assert sample(after, "axiscap_monitor_threshold") == live_server.state.axis.threshold(
        live_server.state.axis.monitor_layer)
    cap_layers = live_server.state.axis.cap_layers
    bites = sum(sample(after, "axiscap_cap_activations_total", layer=str(l)) -
                sample(before, "axiscap_cap_activations_total", layer=str(l)) for l in cap_layers)
    assert bites > 0  # the oracle prompt pushes below tau; only the capped request counts
    prompt_tokens = sum(r.usage.prompt_tokens for r in results.values())
    assert sample(after, "axiscap_prompt_tokens_total") - sample(before, "axiscap_prompt_tokens_total") == prompt_tokens
    assert sample(after, "axiscap_time_to_first_token_seconds_count") - \
        sample(before, "axiscap_time_to_first_token_seconds_count") == 2
    assert sample(after, "axiscap_e2e_request_latency_seconds_count") - \
        sample(before, "axiscap_e2e_request_latency_seconds_count") == 2
    assert sample(after, "axiscap_inter_token_latency_seconds_count") > \
        sample(before, "axiscap_inter_token_latency_seconds_count")
    for reason in ("length", "stop"):  # each request counted once, under its own finish reason
        ended = sum(r.choices[0].finish_reason == reason for r in results.values())
        assert sample(after, "axiscap_requests_total", finish_reason=reason) - \
            sample(before, "axiscap_requests_total", finish_reason=reason) == ended
    assert ("axiscap_requests_running", (("model", MODEL),)) in after
    assert ("axiscap_requests_waiting", (("model", MODEL),)) in after
    assert httpx.post(live_server.base_url + "/v1/completions", json={"model": MODEL}).status_code == 400
    rejected = sample(scrape(live_server.base_url), "axiscap_rejected_requests_total", status="400")
    assert rejected == sample(after, "axiscap_rejected_requests_total", status="400") + 1


@pytest.mark.parametrize("path, family, method, body", [
    ("/v1/chat/completions", "chat", "chat_prompt", {"messages": [{"role": "user", "content": "hi " * 9000}]}),
    ("/v1/completions", "completion", "completion_prompt_ids", {"prompt": "x" * 200_000}),
    ("/tokenize", "tokenization", "tokenize", {"prompt": "x" * 200_000}),
], ids=["chat", "completions", "tokenize"])
def test_prompts_are_tokenized_off_the_event_loop(live_server, monkeypatch, path, family, method, body):
    # A megabyte of prompt takes the tokenizer a second; on the event loop every stream would stall.
    serving, on_loop = getattr(live_server.state, family), []
    monkeypatch.setattr(serving, method, noting_the_event_loop(getattr(serving, method), on_loop))
    response = httpx.post(live_server.base_url + path, json={"model": MODEL, "max_tokens": 1, **body}, timeout=120)
    assert on_loop == [False]
    # Too long for the context: a 400 after tokenizing (the tokenizer endpoint just counts).
    assert response.status_code == (200 if path == "/tokenize" else 400), response.text
