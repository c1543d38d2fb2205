"""Per-message projections of the prompt and the conversation's drift statistics (return_projections)."""

from __future__ import annotations

import openai
import pytest
import torch

from axiscap.server.chat_template import render_chat
from axiscap.steering import record_layer_outputs
from axiscap.steering.drift import EWMA_LAMBDA, conversation_drift

MODEL = "smollm2-135m-instruct"
CONVERSATION = [{"role": "system", "content": "You are an ancient oracle."},
                {"role": "user", "content": "Will I be happy?"},
                {"role": "assistant", "content": "The stars whisper of joy yet to come."},
                {"role": "user", "content": "When will it come?"},
                {"role": "assistant", "content": "When the river forgets its source, child."},
                {"role": "user", "content": "Tell me more."}]


def test_drift_statistics():
    drift = conversation_drift([50.0, 40.0, 30.0], tau=45.0, assistant_std=10.0)
    assert drift.assistant_turns == 3 and drift.cusum_slack == pytest.approx(1.0)
    ewma = 50.0
    for m in (40.0, 30.0):
        ewma = EWMA_LAMBDA * m + (1 - EWMA_LAMBDA) * ewma
    assert drift.ewma == pytest.approx(ewma)
    assert drift.cusum == pytest.approx((45 - 40 - 1) + (45 - 30 - 1))  # the first turn sits above tau: 0
    assert conversation_drift([], tau=45.0).ewma is None


def content_tokens(tokenizer, prompt_ids: list[int], content: str, after: int) -> tuple[int, int]:
    """Where a message's own tokens lie, found another way: its text tokenized alone, located in the prompt."""
    own = tokenizer(content, add_special_tokens=False)["input_ids"]
    for start in range(after, len(prompt_ids) - len(own) + 1):
        if prompt_ids[start:start + len(own)] == own:
            return start, start + len(own)
    raise AssertionError(f"{content!r} not found")


def test_message_spans_are_the_messages_own_tokens(smollm2):
    prompt = render_chat(smollm2.tokenizer, CONVERSATION)
    after = 0
    for message, span in zip(CONVERSATION, prompt.spans):
        assert span.role == message["role"]
        assert (span.start, span.end) == content_tokens(smollm2.tokenizer, prompt.ids, message["content"], after)
        after = span.end


def test_per_message_figures_equal_a_direct_computation(live_server, smollm2, smollm2_axis):
    client = openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=4, temperature=0,
                                           extra_body={"capping": False, "return_projections": True}).to_dict()
    figures = reply["prompt_projections"]

    # Directly: the monitor layer's output for the same prompt, projected on the unit axis (no cap).
    prompt = render_chat(smollm2.tokenizer, CONVERSATION)
    monitor = smollm2_axis.monitor_layer
    live_server.state.engine.hooks.set_cap_mask(None)  # the server is idle; its hooks only record
    with torch.no_grad(), record_layer_outputs(smollm2.model, [monitor]) as seen:
        smollm2.model(input_ids=torch.tensor([prompt.ids]))
    direct = (seen[monitor][0][0].float() @ smollm2_axis.unit(monitor)).tolist()

    assert [m["role"] for m in figures["messages"]] == [m["role"] for m in CONVERSATION]
    for message, span in zip(figures["messages"], prompt.spans):
        own = sorted(direct[span.start:span.end])
        assert message["tokens"] == len(own) > 0
        assert message["mean"] == pytest.approx(sum(own) / len(own), rel=1e-3, abs=1e-3)
        assert message["p10"] == pytest.approx(own[int(0.1 * (len(own) - 1))], rel=1e-3, abs=1e-3)
    turns = [m["mean"] for m in figures["messages"] if m["role"] == "assistant"]
    tau = smollm2_axis.threshold(monitor)
    expected = conversation_drift(turns, tau, smollm2_axis.monitor_std)
    assert figures["drift"] == pytest.approx(expected.as_dict())
    assert figures["drift"]["assistant_turns"] == 2


def test_streamed_the_figures_come_once_in_the_first_chunk(live_server):
    client = openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0)
    chunks = [c.to_dict() for c in client.chat.completions.create(
        model=MODEL, messages=CONVERSATION, max_tokens=4, temperature=0, stream=True,
        extra_body={"return_projections": True})]
    assert ["prompt_projections" in c for c in chunks] == [True] + [False] * (len(chunks) - 1)
    plain = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=4, temperature=0)
    assert "prompt_projections" not in plain.to_dict()  # only where asked


def test_each_request_observes_its_previous_turn_once_by_depth(live_server):
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    def scrape():
        samples = {}
        for family in text_string_to_metric_families(httpx.get(live_server.base_url + "/metrics").text):
            for s in family.samples:
                samples[(s.name, s.labels.get("depth"), s.labels.get("le"))] = s.value
        return samples

    client = openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0)
    before = scrape()
    reply = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=3, temperature=0, n=2,
                                           extra_body={"return_projections": True}).to_dict()
    client.chat.completions.create(model=MODEL, messages=CONVERSATION[:2], max_tokens=3)  # no assistant turn yet
    after = scrape()

    def grew(name, depth, le=None):
        return after[(name, depth, le)] - before[(name, depth, le)]

    counts = {d: grew("axiscap_previous_turn_projection_count", d) for d in ("1", "2-3", "4-7", "8+")}
    assert counts == {"1": 0, "2-3": 1, "4-7": 0, "8+": 0}  # two assistant turns: depth 2; n=2 counts once
    # The observation is the last assistant turn's mean (as the response reports it): every bucket edge at
    # or above it grew by one, every edge below it by none.
    last_turn = [m for m in reply["prompt_projections"]["messages"] if m["role"] == "assistant"][-1]["mean"]
    edges = [le for (name, depth, le) in after if name == "axiscap_previous_turn_projection_bucket" and depth == "2-3"]
    for le in edges:
        assert grew("axiscap_previous_turn_projection_bucket", "2-3", le) == (1 if float(le) >= last_turn else 0), le
