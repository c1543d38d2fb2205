"""One scripted mix of requests (stop, length, several choices, a client that leaves, timeouts, 400s, a
429, a poisoned request among good ones; streaming and not) for the metrics conformance tests: every
backend must count it the same way, each request in exactly one counter."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import httpx
from prometheus_client.parser import text_string_to_metric_families

MODEL = "smollm2-135m-instruct"
TIMEOUT_S = 2.0  # --request-timeout while the mix runs
ENDED = "axiscap_requests_total"
REJECTED = "axiscap_rejected_requests_total"


def scrape(base_url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def series(samples: dict) -> set[tuple[str, tuple[str, ...]]]:
    """Names and label names of the series, without values: what must not differ between backends."""
    return {(name, tuple(k for k, _ in labels)) for name, labels in samples}


def diff(before: dict, after: dict, name: str, label: str) -> dict[str, float]:
    """How much each ``label`` value of counter ``name`` grew (zeros left out)."""
    grown = {}
    for (n, labels), value in after.items():
        if n == name and (d := value - before.get((n, labels), 0.0)):
            grown[dict(labels)[label]] = d
    return grown


def chat(content: str, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0, **fields}


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "Once upon a time", "temperature": 0, **fields}


async def _ask(http: httpx.AsyncClient, path: str, body: dict) -> list[str]:
    """The outcome of one HTTP request as the client sees it: each choice's finish reason (a timeout as
    "timeout"), or "rejected-<status>" for an error before generating."""
    if not body.get("stream"):
        r = await http.post(path, json=body)
        if r.status_code == 504:
            return ["timeout"] * body.get("n", 1)
        if r.status_code != 200:
            return [f"rejected-{r.status_code}"]
        return [c["finish_reason"] for c in r.json()["choices"]]
    finishes: dict[int, str] = {}
    async with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return [f"rejected-{r.status_code}"]
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                assert chunk["error"]["type"] == "timeout_error", chunk
                return ["timeout"] * body.get("n", 1)
            for choice in chunk["choices"]:
                if choice["finish_reason"]:
                    finishes[choice["index"]] = choice["finish_reason"]
    return [finishes[i] for i in sorted(finishes)]


async def _leave_after_three_chunks(http: httpx.AsyncClient) -> list[str]:
    body = completion(max_tokens=500, ignore_eos=True, stream=True)
    async with http.stream("POST", "/v1/completions", json=body) as r:
        seen = 0
        async for line in r.aiter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break  # leaving the block closes the connection: the client is gone
    return ["cancelled"]


async def _mix(base_url: str, state, monkeypatch) -> list[str]:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
        outcomes = []
        for path, body in [
            ("/v1/chat/completions", chat("What is 2+2? Answer in one short sentence.", max_tokens=64)),
            ("/v1/chat/completions", chat("What is 2+2? Answer in one short sentence.", max_tokens=64, stream=True)),
            ("/v1/completions", completion(max_tokens=5)),
            ("/v1/completions", completion(max_tokens=5, stream=True, stream_options={"include_usage": True})),
            ("/v1/completions", completion(max_tokens=4, n=2)),
            ("/v1/chat/completions", chat("hi", temperature=3)),  # out of range: 400
            ("/v1/chat/completions", chat("hi", model="no-such-model")),  # 404
        ]:
            outcomes += await _ask(http, path, body)
        outcomes += await _leave_after_three_chunks(http)
        # A poisoned request among good streams: only it is refused.
        good = [asyncio.create_task(_ask(http, "/v1/completions", completion(max_tokens=6, stream=True)))
                for _ in range(2)]
        outcomes += await _ask(http, "/v1/chat/completions", chat("hi", seed=2**64))
        for task in good:
            outcomes += await task
        # Timeouts, streamed and not.
        monkeypatch.setattr(state.settings, "request_timeout", TIMEOUT_S)
        long = completion(max_tokens=900, ignore_eos=True)  # within the vLLM test server's 1024-token context
        outcomes += await _ask(http, "/v1/completions", long)
        outcomes += await _ask(http, "/v1/completions", {**long, "stream": True})
        monkeypatch.undo()
        # A full queue: 429 before any engine takes the request.
        monkeypatch.setattr(state.engine, "max_waiting", -1000)
        outcomes += await _ask(http, "/v1/completions", completion(max_tokens=2))
        monkeypatch.undo()
        return outcomes


def run_mix(base_url: str, state, monkeypatch) -> tuple[list[str], dict, dict]:
    """Send the mix; its outcomes, and /metrics before and after (once every request is counted)."""
    before = scrape(base_url)
    outcomes = asyncio.run(_mix(base_url, state, monkeypatch))
    ended = sum(1 for o in outcomes if not o.startswith("rejected"))
    deadline = time.monotonic() + 60
    while True:  # the client that left is counted at the engine's next step
        after = scrape(base_url)
        if sum(diff(before, after, ENDED, "finish_reason").values()) >= ended or time.monotonic() > deadline:
            return outcomes, before, after


def assert_counted_once_each(outcomes: list[str], before: dict, after: dict) -> None:
    """Every engine request in exactly one finish reason, every refused HTTP request in exactly one
    status, never both; latencies where they belong."""
    expected = Counter(o for o in outcomes if not o.startswith("rejected"))
    rejected = Counter(o.removeprefix("rejected-") for o in outcomes if o.startswith("rejected"))
    assert set(expected) == {"stop", "length", "cancelled", "timeout"}, outcomes
    assert rejected == {"400": 2, "404": 1, "429": 1}, outcomes
    assert diff(before, after, ENDED, "finish_reason") == dict(expected)
    assert diff(before, after, REJECTED, "status") == dict(rejected)
    e2e = ("axiscap_e2e_request_latency_seconds_count", (("model", MODEL),))
    assert after[e2e] - before.get(e2e, 0) == expected["stop"] + expected["length"]
    ttft = ("axiscap_time_to_first_token_seconds_count", (("model", MODEL),))
    assert expected["stop"] + expected["length"] <= after[ttft] - before.get(ttft, 0) <= sum(expected.values())
