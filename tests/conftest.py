"""Shared fixtures: tiny random models for the math, the real SmolLM2 for behaviour."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHIPPED_AXIS = REPO / "axes" / "smollm2-135m-instruct.safetensors"


def pytest_collection_modifyitems(items):
    """Every test that loads the real model (directly or through a server fixture) is marked ``model``."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.model)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model, loaded once (de-quantized into the user cache on first use)."""
    from axiscap.server.config import Settings
    from axiscap.server.engines.hf.model_loading import load_model

    return load_model("smollm2-135m-instruct", device="cpu", cache_dir=Settings().cache_dir)


@pytest.fixture(scope="session")
def smollm2_axis(smollm2):
    from axiscap.steering import load_axis

    return load_axis(SHIPPED_AXIS, smollm2.n_layers, smollm2.model.config.hidden_size)


def chat_ids(tokenizer, user: str, system: str | None = None) -> list[int]:
    """A chat prompt's token ids, through the server's own path (``render_chat``)."""
    from axiscap.server.chat_template import render_chat

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return render_chat(tokenizer, messages, spans=False).ids


def assert_openai_error(response, status: int, param=...) -> dict:
    """The response is an OpenAI error object with this status (and this param, when given)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not ...:
        assert error["param"] == param, error
    return error


@contextmanager
def server(smollm2, smollm2_axis, **overrides):
    """A live server with its own settings (short completions unless told otherwise)."""
    from axiscap.server.app import create_app, serve_in_background
    from axiscap.server.state import build_state
    from axiscap.server.config import Settings

    state = build_state(Settings(**{"default_max_tokens": 16, **overrides}), smollm2, smollm2_axis)
    with serve_in_background(create_app(state)) as base_url:
        yield SimpleNamespace(base_url=base_url, state=state)


@pytest.fixture(scope="module")
def live_server(smollm2, smollm2_axis):
    with server(smollm2, smollm2_axis, max_batch_size=8, max_waiting=4, default_max_tokens=64) as live:
        yield live


def tiny_model(family: str, seed: int = 0):
    """A randomly initialised 4-layer model of the given family (no download)."""
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Qwen3Config

    torch.manual_seed(seed)
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config = {
        "llama": lambda: LlamaConfig(**common),
        "qwen3": lambda: Qwen3Config(**common, head_dim=8),
        "gemma2": lambda: Gemma2Config(**common, head_dim=8, sliding_window=16),
    }[family]()
    return AutoModelForCausalLM.from_config(config).eval()
