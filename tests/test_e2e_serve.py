"""End to end: `axiscap serve` as a user starts it, driven by the official openai package."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from axiscap.server.app import free_port


def test_axiscap_serve_with_openai_sdk(smollm2):  # smollm2: the converted model is cached before the start
    port = free_port()
    env = {**os.environ, "AXISCAP_PORT": str(port)}  # settings from the environment, as in a container
    proc = subprocess.Popen([sys.executable, "-m", "axiscap.cli", "serve", "--no-capping-default"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.3)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        assert client.models.list().data[0].id == "smollm2-135m-instruct"

        chunks = list(client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Name a colour."}],
            max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens > 0
        assert not any("axis_projections" in c.to_dict()["choices"][0] for c in chunks[:-1])  # not asked for
        assert all(c.to_dict()["capping"] is False for c in chunks)  # --no-capping-default
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip()

        capped = client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Name a colour."}],
            max_tokens=8, temperature=0, extra_body={"capping": True, "return_projections": True})
        assert capped.to_dict()["capping"] is True
        assert len(capped.to_dict()["choices"][0]["axis_projections"]) == capped.usage.completion_tokens

        families = {f.name: f for f in text_string_to_metric_families(httpx.get(base + "/metrics").text)}
        projection = {tuple(sorted(s.labels.items())): s.value for s in families["axiscap_axis_projection"].samples
                      if s.name == "axiscap_axis_projection_count"}
        assert projection[(("capping", "off"), ("model", "smollm2-135m-instruct"))] == chunks[-1].usage.completion_tokens
        assert projection[(("capping", "on"), ("model", "smollm2-135m-instruct"))] == capped.usage.completion_tokens
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
