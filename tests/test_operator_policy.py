"""Operator policy on a real server: API keys, who decides capping, projections, timeouts, memory
limits, and /health telling the truth. Each test starts its own server with its own settings."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import assert_openai_error, server

MODEL = "smollm2-135m-instruct"
ORACLE = [{"role": "system", "content": "You are an ancient oracle who speaks in cryptic prophecies."},
          {"role": "user", "content": "Will I be happy?"}]


def test_locked_down_server(smollm2, smollm2_axis):
    with server(smollm2, smollm2_axis, api_keys=["key-one", "key-two"], protect_metrics=True, metrics_key="scrape",
                capping_policy="always", allow_projections=False, request_timeout=3.0) as live:
        base = live.base_url
        body = {"model": MODEL, "messages": ORACLE, "max_tokens": 8, "temperature": 0}

        # Keys: none, wrong, and each right one.
        error = assert_openai_error(httpx.post(base + "/v1/chat/completions", json=body), 401)
        assert error["code"] == "invalid_api_key"
        assert_openai_error(httpx.post(base + "/v1/chat/completions", json=body,
                                       headers={"Authorization": "Bearer key-three"}), 401)
        assert_openai_error(httpx.get(base + "/v1/models"), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).models.list()
        client = openai.OpenAI(base_url=base + "/v1", api_key="key-two", max_retries=0)
        assert client.models.list().data[0].id == MODEL
        assert httpx.get(base + "/health").status_code == 200  # probes need no key by default
        # /metrics opens with the scrape credential only: a client's key is not enough.
        assert_openai_error(httpx.get(base + "/metrics"), 401)
        assert_openai_error(httpx.get(base + "/metrics", headers={"Authorization": "Bearer key-one"}), 401)
        scraped = httpx.get(base + "/metrics", headers={"Authorization": "Bearer scrape"})
        assert scraped.status_code == 200 and "axiscap_axis_projection_bucket" in scraped.text
        assert_openai_error(httpx.get(base + "/openapi.json"), 401)
        assert httpx.get(base + "/openapi.json", headers={"Authorization": "Bearer key-one"}).status_code == 200

        # capping_policy=always: a client asking for no capping is capped anyway, and told so.
        refused = client.chat.completions.create(model=MODEL, messages=ORACLE, max_tokens=8, temperature=0,
                                                 extra_body={"capping": False})
        assert refused.to_dict()["capping"] is True and refused.to_dict()["capping_overridden"] is True
        plain = client.chat.completions.create(model=MODEL, messages=ORACLE, max_tokens=8, temperature=0)
        assert plain.to_dict()["capping"] is True and "capping_overridden" not in plain.to_dict()
        assert refused.choices[0].message.content == plain.choices[0].message.content

        # Projections are refused, with an error the SDK raises.
        with pytest.raises(openai.PermissionDeniedError) as denied:
            client.chat.completions.create(model=MODEL, messages=ORACLE, max_tokens=4,
                                           extra_body={"return_projections": True})
        assert denied.value.body["code"] == "projections_disabled"

        # The per-request timeout: a stream ends with an error event and still with [DONE].
        long = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
                "max_tokens": 4000, "temperature": 0, "stream": True}
        key = {"Authorization": "Bearer key-one"}
        with httpx.stream("POST", base + "/v1/chat/completions", json=long, headers=key, timeout=60) as r:
            data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        assert json.loads(data[-2])["error"]["type"] == "timeout_error"
        assert len(data) > 3  # it streamed tokens before the deadline
        error = assert_openai_error(httpx.post(base + "/v1/chat/completions", json={**long, "stream": False},
                                               headers=key, timeout=60), 504)
        assert error["type"] == "timeout_error"
        assert live.state.engine.runner.rows == []


def test_capping_policy_never_and_projections_allowed(smollm2, smollm2_axis):
    with server(smollm2, smollm2_axis, capping_policy="never") as live:
        client = openai.OpenAI(base_url=live.base_url + "/v1", api_key="unused", max_retries=0)
        asked = client.chat.completions.create(model=MODEL, messages=ORACLE, max_tokens=8, temperature=0,
                                               extra_body={"capping": True, "return_projections": True})
        d = asked.to_dict()
        assert d["capping"] is False and d["capping_overridden"] is True
        assert len(d["choices"][0]["axis_projections"]) == asked.usage.completion_tokens


def test_memory_limits_answer_400_before_queueing(smollm2, smollm2_axis):
    with server(smollm2, smollm2_axis, max_model_len=128, kv_cache_tokens=100) as live:
        url = live.base_url + "/v1/completions"
        error = assert_openai_error(httpx.post(url, json={"model": MODEL, "prompt": "word " * 200, "max_tokens": 1}),
                                    400)
        assert error["code"] == "context_length_exceeded" and "128" in error["message"]
        error = assert_openai_error(httpx.post(url, json={"model": MODEL, "prompt": "Hi", "max_tokens": 127}), 400)
        assert error["code"] == "context_length_exceeded"
        # Within max_model_len but over the whole KV cache: it could never run.
        error = assert_openai_error(httpx.post(url, json={"model": MODEL, "prompt": "Hi", "max_tokens": 110}), 400)
        assert "KV cache" in error["message"]
        ok = httpx.post(url, json={"model": MODEL, "prompt": "Hi", "max_tokens": 20}, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] > 0


class _ThreadKiller(BaseException):
    """Escapes the engine loop's ``except Exception``, as a crash of the thread itself would."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the crash is the point
def test_health_is_503_once_the_engine_is_dead(smollm2, smollm2_axis, monkeypatch):
    with server(smollm2, smollm2_axis) as live:
        engine = live.state.engine
        assert httpx.get(live.base_url + "/health").json()["status"] == "ok"

        def crash():
            raise _ThreadKiller()

        monkeypatch.setattr(engine, "_drop_ended", crash)  # the thread's next iteration dies
        with engine.scheduler.lock:
            engine.scheduler.waiting.append(object())  # work, so that the thread wakes up
            engine.scheduler.lock.notify()
        engine._thread.join(timeout=30)
        assert not engine._thread.is_alive() and not engine._stopping  # died, not stopped
        r = httpx.get(live.base_url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
        engine.scheduler.waiting.clear()


def test_protect_metrics_without_a_scrape_credential_refuses_to_start():
    from axiscap.server.config import Settings

    with pytest.raises(ValueError, match="--metrics-key"):
        Settings(protect_metrics=True, api_keys=["client"])


def persona_samples(text: str) -> dict[str, float]:
    """The per-token persona series of a /metrics page, by sample name and labels."""
    return {f"{s.name}{sorted(s.labels.items())}": s.value for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name.startswith(("axiscap_axis_projection", "axiscap_tokens_below", "axiscap_cap_activations"))}


def test_an_open_metrics_page_does_not_give_back_withheld_projections(smollm2, smollm2_axis):
    """Under --no-allow-projections without a scrape credential, a client who diffs /metrics around its
    own request learns nothing of its tokens' projections: the persona series are not exported."""
    body = {"model": MODEL, "messages": ORACLE, "max_tokens": 8, "temperature": 0, "capping": False}
    with server(smollm2, smollm2_axis, allow_projections=False) as live:
        before = httpx.get(live.base_url + "/metrics").text
        answer = httpx.post(live.base_url + "/v1/chat/completions", json=body, timeout=60).json()
        after = httpx.get(live.base_url + "/metrics").text
        assert answer["usage"]["completion_tokens"] == 8
        assert persona_samples(before) == persona_samples(after) == {}
        assert "axiscap_generation_tokens_total" in after  # the serving figures stay
    # The same request on a server that allows projections does show up in those series: the diff above
    # would have recovered it.
    with server(smollm2, smollm2_axis) as live:
        before = persona_samples(httpx.get(live.base_url + "/metrics").text)
        httpx.post(live.base_url + "/v1/chat/completions", json=body, timeout=60)
        after = persona_samples(httpx.get(live.base_url + "/metrics").text)
        changed = {k for k in after if after[k] != before.get(k)}
        assert any(k.startswith("axiscap_axis_projection_bucket") for k in changed)


def test_one_large_request_cannot_hold_every_other_client(smollm2, smollm2_axis):
    """The issue's request (every choice's whole context at once) is refused past --max-request-kv-share;
    the largest allowed one runs, a second one waits for room, and small requests sent after it pass it
    (skip-ahead) and finish while the first still runs."""
    def big(n: int) -> dict:  # each choice reserves a 256-token slot: prompt + 200
        return {"model": MODEL, "prompt": "Once upon a time", "n": n, "max_tokens": 200, "ignore_eos": True,
                "temperature": 0}

    async def scenario(base_url, engine):
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as http:
            refused = await http.post("/v1/completions", json=big(6))  # 6 x (4 + 200) > half of 2048
            first_chunk, done = asyncio.Event(), {}

            async def stream_big(name):
                async with http.stream("POST", "/v1/completions", json={**big(4), "stream": True}) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            first_chunk.set()
                done[name] = asyncio.get_running_loop().time()

            async def small(i):
                r = await http.post("/v1/completions", json={"model": MODEL, "prompt": f"{i} plus {i} is",
                                                             "max_tokens": 4})
                done[f"small-{i}"] = asyncio.get_running_loop().time()
                return r.status_code

            first = asyncio.create_task(stream_big("first"))
            await first_chunk.wait()
            second = asyncio.create_task(stream_big("second"))
            while len(engine.scheduler.waiting) < 4:  # the second cannot fit beside the first: it waits
                await asyncio.sleep(0.01)
            statuses = await asyncio.gather(*[small(i) for i in range(8)])
            await asyncio.gather(first, second)
            return refused, statuses, done

    with server(smollm2, smollm2_axis, kv_cache_tokens=2048, max_request_kv_share=0.5) as live:
        refused, statuses, done = asyncio.run(scenario(live.base_url, live.state.engine))
    error = assert_openai_error(refused, 400, "max_tokens")
    assert "--max-request-kv-share" in error["message"] and error["code"] == "context_length_exceeded"
    assert statuses == [200] * 8
    assert max(done[f"small-{i}"] for i in range(8)) < done["first"] < done["second"]


def slow_client(base_url: str, parts: list[bytes], gap: float) -> tuple[bytes, float]:
    """Send ``parts`` with ``gap`` seconds between them (stopping once the server closes); the reply and
    the seconds until the server closed the connection."""
    import socket
    import time

    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        start = time.monotonic()
        for part in parts:
            try:
                sock.sendall(part)
            except OSError:  # closed under us: what we wanted
                break
            sock.settimeout(gap)
            try:
                if reply := sock.recv(65536):
                    sock.settimeout(30)
                    while more := sock.recv(65536):
                        reply += more
                    return reply, time.monotonic() - start
            except socket.timeout:
                continue
        sock.settimeout(30)
        reply = b""
        while more := sock.recv(65536):
            reply += more
        return reply, time.monotonic() - start


def test_slow_headers_and_slow_bodies_get_408_and_lose_their_connection(smollm2, smollm2_axis):
    body = json.dumps({"model": MODEL, "messages": ORACLE, "max_tokens": 2}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(body))
    headers_line_by_line = [b"POST /v1/chat/completions HTTP/1.1\r\n"] + [b"x-slow-%d: 1\r\n" % i for i in range(40)]
    with server(smollm2, smollm2_axis, read_timeout=1.5) as live:
        for parts in (headers_line_by_line, [head] + [bytes([c]) for c in body]):
            reply, seconds = slow_client(live.base_url, parts, gap=0.5)
            assert reply.startswith(b"HTTP/1.1 408"), reply
            assert b'"error"' in reply and b"read timeout" in reply
            assert 1.5 <= seconds < 10
        # A client that sends nothing at all is closed too; one that sends promptly is served.
        reply, seconds = slow_client(live.base_url, [b""], gap=0.5)
        assert reply.startswith(b"HTTP/1.1 408") and seconds < 10
        # Answered early (413 for a declared size) while the body still trickles in: closed, not held.
        import socket
        import time

        host, port = live.base_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head.replace(b"content-length: %d" % len(body), b"content-length: 3000000"))
            assert sock.recv(1024).startswith(b"HTTP/1.1 413")
            start, closed = time.monotonic(), False
            while not closed and time.monotonic() - start < 15:
                try:
                    sock.sendall(b"x")
                    time.sleep(0.25)
                except OSError:
                    closed = True
            assert closed and time.monotonic() - start < 10
        rejected = {s.labels["status"]: s.value for family in text_string_to_metric_families(
            httpx.get(live.base_url + "/metrics").text) for s in family.samples
            if s.name == "axiscap_rejected_requests_total"}
        assert rejected["408"] == 3
        assert httpx.post(live.base_url + "/v1/chat/completions", json={"model": MODEL, "messages": ORACLE, "max_tokens": 2},
                          timeout=60).status_code == 200
