"""Metrics mean one thing: the scripted mix of tests/metrics_mix.py against the built-in engine (the
vLLM backend runs the same mix in tests/test_vllm_backend.py and must count it identically)."""

from __future__ import annotations

from .conftest import server
from .metrics_mix import assert_counted_once_each, run_mix


def test_every_request_is_counted_once_on_the_built_in_engine(smollm2, smollm2_axis, monkeypatch):
    with server(smollm2, smollm2_axis) as live:
        assert_counted_once_each(*run_mix(live.base_url, live.state, monkeypatch))


def test_statistics_are_recorded_on_the_event_loop_not_the_engine_thread(smollm2, smollm2_axis, monkeypatch):
    import threading

    import httpx

    threads = set()
    with server(smollm2, smollm2_axis) as live:
        metrics = live.state.metrics
        record = metrics.record

        def noting_the_thread(stats):
            threads.add(threading.current_thread().name)
            record(stats)

        monkeypatch.setattr(metrics, "record", noting_the_thread)
        r = httpx.post(live.base_url + "/v1/completions", json={"model": "smollm2-135m-instruct", "prompt": "Hi",
                                                                "max_tokens": 4}, timeout=60)
        assert r.status_code == 200
    assert threads and "axiscap-engine" not in threads, threads
