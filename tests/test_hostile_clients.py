"""Hostile and broken clients against the real server: each gets its own 4xx; nobody else notices."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from .conftest import assert_openai_error

MODEL = "smollm2-135m-instruct"
HI = [{"role": "user", "content": "hi"}]


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": HI, "max_tokens": 2, **fields}


def nested(depth: int, kind: str) -> bytes:
    inner = ("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth)
    return f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}], "x": {inner}}}'.encode()


# (name, path, body: dict or raw bytes, expected status, expected error param or None)
HOSTILE = [
    ("seed 2^64", "/v1/chat/completions", chat(seed=2**64), 400, "seed"),
    ("seed 2^200", "/v1/chat/completions", chat(seed=2**200), 400, "seed"),
    ("seed below int64", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 2, "seed": -(2**63) - 1},
     400, "seed"),
    ("lone surrogate in content", "/v1/chat/completions",
     json.dumps(chat(messages=[{"role": "user", "content": "a\ud800b"}])).encode(), 400, "messages.0.content"),
    ("lone surrogate in prompt", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": "\udfff", "max_tokens": 2}).encode(), 400, "prompt"),
    # The item's own error (not "stop is not a string", the other member of the union it failed).
    ("lone surrogate in a stop string", "/v1/chat/completions", json.dumps(chat(stop=["\ud800"])).encode(),
     400, "stop.0"),
    ("list nested 5000 deep", "/v1/chat/completions", nested(5000, "list"), 400, None),
    ("dict nested 5000 deep", "/v1/chat/completions", nested(5000, "dict"), 400, None),
    ("user content null", "/v1/chat/completions", chat(messages=[{"role": "user", "content": None}]), 400,
     "messages.0"),
    ("tool message without tool_call_id", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": "hi"}, {"role": "tool", "content": "sunny"}]), 400, "messages.1"),
    ("1000 messages", "/v1/chat/completions",
     chat(messages=[{"role": "user" if i % 2 == 0 else "assistant", "content": "ok"} for i in range(1000)]),
     400, "messages"),
    ("prompt token id past the embedding", "/v1/completions",
     {"model": MODEL, "prompt": [1, 2, 49152], "max_tokens": 2}, 400, "prompt"),
    # str.isdigit() takes these, int() does not (a 500 and a reset connection before).
    ("superscript digit in logit_bias", "/v1/chat/completions", chat(logit_bias={"²": 5}), 400, "logit_bias"),
    ("Arabic-Indic digits in logit_bias", "/v1/completions",
     {"model": MODEL, "prompt": "a", "max_tokens": 2, "logit_bias": {"\u0661\u0662": 1}}, 400, "logit_bias"),
    ("empty stop strings", "/v1/chat/completions", chat(stop=["", ""]), 400, "stop"),
    ("one empty stop string", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 2, "stop": ""},
     400, "stop"),
    ("temperature NaN", "/v1/chat/completions", b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], '
     b'"temperature": NaN}' % MODEL.encode(), 400, "temperature"),
    ("echo logprobs past --max-prompt-logprobs-tokens", "/v1/completions",
     {"model": MODEL, "prompt": [1000] * 1000, "n": 5, "echo": True, "logprobs": 1, "max_tokens": 1}, 400, "logprobs"),
    ("top_p Infinity", "/v1/completions", b'{"model": "%s", "prompt": "a", "top_p": Infinity}' % MODEL.encode(),
     400, "top_p"),
]


def post(base_url: str, path: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(base_url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    return httpx.post(base_url + path, json=body, timeout=60)


@pytest.mark.parametrize("name, path, body, status, param", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_request_gets_its_own_openai_error(live_server, name, path, body, status, param):
    assert_openai_error(post(live_server.base_url, path, body), status, param)
    assert httpx.get(live_server.base_url + "/health").status_code == 200


def test_a_nan_is_called_what_it_is(live_server):
    nan = next(body for name, _, body, _, _ in HOSTILE if name == "temperature NaN")
    error = assert_openai_error(post(live_server.base_url, "/v1/chat/completions", nan), 400)
    assert "finite" in error["message"], error


def test_min_tokens_past_the_end_of_a_grammar_ends_with_the_grammar(live_server):
    """A boolean is over after one token: min_tokens cannot hold the document open (a 500 before)."""
    body = chat(max_tokens=12, min_tokens=6, temperature=0,
                response_format={"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "boolean"}}})
    for _ in range(2):  # and the connection stays usable
        r = post(live_server.base_url, "/v1/chat/completions", body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert json.loads(choice["message"]["content"]) in (True, False)
        assert choice["finish_reason"] == "stop"


def test_edge_values_that_are_valid_are_served(live_server):
    base = live_server.base_url
    assert post(base, "/v1/chat/completions", chat(seed=2**63 - 1, temperature=1)).status_code == 200
    assert post(base, "/v1/chat/completions", chat(seed=-(2**63), temperature=1)).status_code == 200
    nul = post(base, "/v1/chat/completions", chat(messages=[{"role": "user", "content": "a\u0000b"}]))
    assert nul.status_code == 200 and nul.json()["choices"][0]["finish_reason"] == "length"
    # An assistant turn that only called tools may come without content.
    assistant_null = chat(messages=[*HI, {"role": "assistant", "content": None}, {"role": "user", "content": "ok"}])
    assert post(base, "/v1/chat/completions", assistant_null).status_code == 200
    many_fields = {**chat(), **{f"x{i}": i for i in range(20000)}}
    assert post(base, "/v1/chat/completions", many_fields).status_code == 200


def test_oversized_body_gets_413_declared_or_chunked(live_server):
    huge = json.dumps(chat(messages=[{"role": "user", "content": "x" * (3 * 1024 * 1024)}])).encode()
    assert_openai_error(post(live_server.base_url, "/v1/chat/completions", huge), 413)

    def chunks():  # no Content-Length: the server only learns the size while reading
        for i in range(0, len(huge), 65536):
            yield huge[i:i + 65536]

    chunked = httpx.post(live_server.base_url + "/v1/chat/completions", content=chunks(),
                         headers={"content-type": "application/json"}, timeout=60)
    assert "content-length" not in chunked.request.headers
    assert_openai_error(chunked, 413)


def test_paths_and_methods_answer_with_openai_errors(live_server):
    base = live_server.base_url
    slash = httpx.post(base + "/v1/chat/completions/", json=chat(), follow_redirects=False)
    assert_openai_error(slash, 404)
    head = httpx.head(base + "/v1/models")
    assert head.status_code == 200 and head.content == b""
    wrong = httpx.delete(base + "/v1/models")
    assert_openai_error(wrong, 405)
    assert "GET" in wrong.headers["allow"]
    for path in ("/playground", "/metrics", "/health", "/v1/models"):  # HEAD wherever GET works
        got, head = httpx.get(base + path), httpx.head(base + path)
        assert got.status_code == head.status_code == 200 and head.content == b"", path
    # FastAPI's /docs and /redoc pages load scripts from a CDN: not served.
    for path in ("/docs", "/redoc"):
        assert_openai_error(httpx.get(base + path), 404)
    assert "/v1/chat/completions" in httpx.get(base + "/openapi.json").json()["paths"]


def test_poisoned_requests_join_six_streams_and_all_six_finish(live_server):
    """The failure the issue reported: seed 2^64 joined six streams and all six died."""
    prompts = ["What is the capital of France?", "hi", "Name a colour.", "What is 2+2?", "Say yes.", "Name a fruit."]
    poisons = [h for h in HOSTILE if h[3] == 400]

    def body(i, prompt, stream):
        return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": 24, "stream": stream, "capping": i % 2 == 0}

    async def stream_one(http, i, prompt, started):
        text, finish = "", None
        async with http.stream("POST", "/v1/chat/completions", json=body(i, prompt, True)) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"].get("content", "")
                finish = choice["finish_reason"] or finish
                started.add(i)
        return text, finish

    async def run_all():
        async with httpx.AsyncClient(base_url=live_server.base_url, timeout=120) as http:
            alone = [(await http.post("/v1/chat/completions", json=body(i, p, False))).json()["choices"][0]
                     for i, p in enumerate(prompts)]
            started: set[int] = set()
            streams = [asyncio.create_task(stream_one(http, i, p, started)) for i, p in enumerate(prompts)]
            while len(started) < len(prompts):
                await asyncio.sleep(0.01)
            hostile = [await http.post(path, content=b if isinstance(b, bytes) else json.dumps(b).encode(),
                                       headers={"content-type": "application/json"})
                       for _, path, b, _, _ in poisons]
            return alone, await asyncio.gather(*streams), hostile

    alone, streamed, hostile = asyncio.run(run_all())
    assert [r.status_code for r in hostile] == [400] * len(poisons)
    assert streamed == [(a["message"]["content"], a["finish_reason"]) for a in alone]


def test_a_client_that_leaves_a_non_stream_request_leaves_no_error_in_the_log(live_server, caplog):
    import gc
    import logging
    import time

    engine = live_server.state.engine

    async def leave():
        async with httpx.AsyncClient(base_url=live_server.base_url, timeout=60) as http:
            sent = asyncio.create_task(http.post("/v1/completions", json={
                "model": MODEL, "prompt": "Once upon a time", "n": 3, "max_tokens": 300, "ignore_eos": True}))
            while len(engine.runner.rows) < 3:
                await asyncio.sleep(0.01)
            sent.cancel()

    with caplog.at_level(logging.WARNING):
        asyncio.run(leave())
        deadline = time.monotonic() + 30
        while engine.runner.rows and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.runner.rows  # the slots are free
        gc.collect()  # a cancelled gather nobody retrieved is logged when it is collected
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
