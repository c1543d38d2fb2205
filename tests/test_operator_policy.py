"""Operator policy on a real server: API keys, who decides capping, projections, timeouts, memory
limits, and /health telling the truth. Each test starts its own server with its own settings."""

from __future__ import annotations

import json
import httpx
import openai
import pytest

from .conftest import assert_openai_error, server

MODEL = "smollm2-135m-instruct"
ORACLE = [{"role": "system", "content": "You are an ancient oracle who speaks in cryptic prophecies."},
          {"role": "user", "content": "Will I be happy?"}]


def test_locked_down_server(smollm2, smollm2_axis):
    with server(smollm2, smollm2_axis, api_keys=["key-one", "key-two"], protect_metrics=True,
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
        assert_openai_error(httpx.get(base + "/metrics"), 401)
        assert httpx.get(base + "/metrics", headers={"Authorization": "Bearer key-one"}).status_code == 200

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
        assert live.state.engine._rows == []


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
        ok = httpx.post(url, json={"model": MODEL, "prompt": "Hi", "max_tokens": 20})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] > 0


def test_health_is_503_once_the_engine_is_dead(smollm2, smollm2_axis):
    with server(smollm2, smollm2_axis) as live:
        assert httpx.get(live.base_url + "/health").json()["status"] == "ok"
        live.state.engine.stop()  # as if the engine thread had died
        r = httpx.get(live.base_url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
