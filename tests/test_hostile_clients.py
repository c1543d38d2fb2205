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
    ("lone surrogate in a stop string", "/v1/chat/completions", json.dumps(chat(stop=["\ud800"])).encode(),
     400, "stop"),
    ("list nested 5000 deep", "/v1/chat/completions", nested(5000, "list"), 400, None),
    ("dict nested 5000 deep", "/v1/chat/completions", nested(5000, "dict"), 400, None),
    ("user content null", "/v1/chat/completions", chat(messages=[{"role": "user", "content": None}]), 400,
     "messages.0"),
    ("1000 messages", "/v1/chat/completions",
     chat(messages=[{"role": "user" if i % 2 == 0 else "assistant", "content": "ok"} for i in range(1000)]),
     400, "messages"),
    ("prompt token id past the embedding", "/v1/completions",
     {"model": MODEL, "prompt": [1, 2, 49152], "max_tokens": 2}, 400, "prompt"),
]


def post(base_url: str, path: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(base_url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    return httpx.post(base_url + path, json=body, timeout=60)


@pytest.mark.parametrize("name, path, body, status, param", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_request_gets_its_own_openai_error(live_server, name, path, body, status, param):
    assert_openai_error(post(live_server.base_url, path, body), status, param)
    assert httpx.get(live_server.base_url + "/health").status_code == 200


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
