"""The official openai SDK over a real server, through every field beyond the basics: logprobs,
top_logprobs, echo, n, penalties, logit_bias, min_tokens, ignore_eos, response_format, and vLLM's
/tokenize, /detokenize and /version. Shapes are checked against the SDK's own types."""

from __future__ import annotations

import asyncio
import json
import math
from importlib.metadata import version

import httpx
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionTokenLogprob
from openai.types.completion_choice import Logprobs

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def aclient(live_server):
    # One per test: each test runs its own event loop, and a client's connections belong to one.
    return openai.AsyncOpenAI(base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0)


def strictly_typed(cls, obj):
    """Re-validate what the SDK parsed (it builds its models leniently) against its own type."""
    return cls.model_validate(obj.to_dict())


def tokenize(live_server, **body) -> list[int]:
    r = httpx.post(live_server.base_url + "/tokenize", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


# --- logprobs ----------------------------------------------------------------------------------

def test_chat_logprobs_have_the_sdk_shape_and_greedy_picks_the_top_token(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8,
                                       logprobs=True, top_logprobs=3, extra_body={"capping": False})
    strictly_typed(ChatCompletion, r)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(isinstance(entry, ChatCompletionTokenLogprob) for entry in content)
    assert r.choices[0].finish_reason == "stop" and content[-1].token == "<|im_end|>"  # EOS is listed, as vLLM does
    assert "".join(entry.token for entry in content[:-1]) == r.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and values[0] <= 0
        assert entry.top_logprobs[0].token == entry.token and entry.logprob == pytest.approx(values[0])
        assert bytes(entry.bytes).decode() == entry.token
        assert sum(math.exp(v) for v in values) <= 1 + 1e-4
    streamed = [entry for chunk in client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3, stream=True,
        extra_body={"capping": False}) for entry in chunk.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_generated_logprobs_equal_the_prompt_logprobs_of_the_same_tokens(client, live_server):
    """Two code paths agree: a decode step's logprobs and a prefill's (echo) for the same tokens."""
    prompt = "The three primary colours are"
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=6, logprobs=2,
                                  extra_body={"capping": False})
    strictly_typed(Completion, r)
    generated = r.choices[0].logprobs
    assert isinstance(generated, Logprobs) and len(generated.tokens) == 6
    ids = tokenize(live_server, prompt=prompt)
    full = ids + tokenize(live_server, prompt=r.choices[0].text, add_special_tokens=False)
    echoed = client.completions.create(model=MODEL, prompt=full, temperature=0, max_tokens=1, logprobs=2, echo=True,
                                       extra_body={"capping": False}).choices[0].logprobs
    assert echoed.token_logprobs[0] is None and echoed.top_logprobs[0] is None
    assert len(echoed.tokens) == len(full) + 1
    n = len(ids)
    assert echoed.tokens[n:n + 6] == generated.tokens
    for a, b in zip(echoed.token_logprobs[n:n + 6], generated.token_logprobs):
        assert a == pytest.approx(b, abs=2e-3)
    for a, b in zip(echoed.top_logprobs[n:n + 6], generated.top_logprobs):
        assert a.keys() == b.keys()  # the top 2 and the chosen token (here one of them)
        assert len(a) == 2


def test_logprobs_are_divided_by_the_temperature(client):
    prompt = "Once upon a time"
    greedy, hot = (client.completions.create(model=MODEL, prompt=prompt, temperature=t, max_tokens=1, logprobs=2,
                                             echo=True, extra_body={"capping": False}).choices[0].logprobs
                   for t in (0, 0.5))
    for g, h in zip(greedy.top_logprobs[1:-1], hot.top_logprobs[1:-1]):
        (a, ga), (b, gb) = sorted(g.items(), key=lambda kv: -kv[1])[:2]
        assert h[a] - h[b] == pytest.approx(2 * (ga - gb), abs=2e-3)


def test_echo_puts_the_prompt_first_streaming_or_not(client):
    prompt = "Paris is the capital of"
    full = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=3, echo=True)
    assert full.choices[0].text.startswith(prompt) and len(full.choices[0].text) > len(prompt)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=3, echo=True,
                                            logprobs=1, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks for o in c.choices[0].logprobs.text_offset]
    assert "".join(tokens) == full.choices[0].text  # the prompt's tokens, then the completion's
    assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]


# --- n ------------------------------------------------------------------------------------------

def test_n_choices_stream_and_not_with_their_own_projections(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Name an animal."}], temperature=1.0,
                  max_tokens=6, n=3, seed=11, extra_body={"return_projections": True})
    full = client.chat.completions.create(**kwargs)
    strictly_typed(ChatCompletion, full)
    assert [c.index for c in full.choices] == [0, 1, 2]
    texts = [c.message.content for c in full.choices]
    assert len(set(texts)) > 1  # seed, seed + 1, seed + 2: not three copies
    lengths = [len(c.to_dict()["axis_projections"]) for c in full.choices]
    assert all(length >= 1 for length in lengths)
    assert full.usage.completion_tokens == sum(lengths)

    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    for chunk in chunks:
        strictly_typed(ChatCompletionChunk, chunk)
    streamed = {i: "" for i in range(3)}
    for chunk in chunks[:-1]:
        assert len(chunk.choices) == 1
        streamed[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
    assert [streamed[i] for i in range(3)] == texts  # seeded choices do not depend on the batch
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    finishes = [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason]
    assert len(finishes) == 3


# --- penalties, bias, min_tokens, ignore_eos ----------------------------------------------------

def token_id(live_server, text: str) -> int:
    [tid] = tokenize(live_server, prompt=text, add_special_tokens=False)
    return tid


def test_logit_bias_forces_a_token_and_a_neighbour_in_the_batch_is_untouched(aclient, live_server):
    paris = token_id(live_server, " Paris")

    async def both():
        plain = dict(model=MODEL, messages=QUESTION, temperature=0, max_tokens=6)
        return await asyncio.gather(
            aclient.chat.completions.create(**plain, logit_bias={str(paris): 100}),
            aclient.chat.completions.create(**plain))

    async def alone():
        return await aclient.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=6)

    async def run():
        return await both(), await alone()

    (biased, plain), alone = asyncio.run(run())
    assert biased.choices[0].message.content == " Paris" * 6
    assert plain.choices[0].message.content == alone.choices[0].message.content


def test_penalties_break_a_repetition(client):
    prompt = "1, 1, 1, 1, 1, 1, 1,"
    plain = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=6, logprobs=0)
    assert plain.choices[0].text == " 1, 1,"  # six tokens: " ", "1", ","
    # Frequency and presence count generated tokens only: the first "1" is still free, the next is not.
    penalized = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=6,
                                          frequency_penalty=2.0, presence_penalty=2.0)
    assert penalized.choices[0].text.startswith(" 1, ") and not penalized.choices[0].text.startswith(" 1, 1")
    # vLLM's repetition penalty counts the prompt too: " " and "1" are penalized from the first token.
    repeated = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=6, logprobs=0,
                                         extra_body={"repetition_penalty": 3.0})
    assert repeated.choices[0].logprobs.tokens[0] not in (" ", "1")


def test_min_tokens_and_ignore_eos_lengthen_a_short_answer(client):
    short = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=40)
    assert short.choices[0].finish_reason == "stop"
    n = short.usage.completion_tokens
    longer = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=40,
                                            extra_body={"min_tokens": n + 3})
    assert longer.usage.completion_tokens >= n + 3
    fixed = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=n + 5,
                                           extra_body={"ignore_eos": True})
    assert fixed.usage.completion_tokens == n + 5 and fixed.choices[0].finish_reason == "length"
    assert fixed.choices[0].message.content.startswith(short.choices[0].message.content)


# --- response_format ----------------------------------------------------------------------------

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def test_json_schema_output_parses_and_follows_the_schema(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person."}], temperature=0, max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    person = json.loads(r.choices[0].message.content)
    assert set(person) == {"name", "age"} and isinstance(person["name"], str) and isinstance(person["age"], int)
    assert r.choices[0].finish_reason == "stop"


def test_json_object_streams_as_json_next_to_a_free_request(aclient):
    async def both():
        streamed = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "List three colours."}], temperature=0.7, seed=5,
            max_tokens=60, response_format={"type": "json_object"}, stream=True)
        free = aclient.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8)
        text = "".join([c.choices[0].delta.content or "" async for c in streamed])
        return text, await free

    text, free = asyncio.run(both())
    assert isinstance(json.loads(text), dict)
    assert "Paris" in free.choices[0].message.content  # the grammar is that request's alone


# --- vLLM's tokenizer endpoints -----------------------------------------------------------------

def test_tokenize_counts_what_a_completion_bills(client, live_server):
    ids = tokenize(live_server, messages=QUESTION)
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1)
    assert len(ids) == r.usage.prompt_tokens
    body = httpx.post(live_server.base_url + "/tokenize",
                      json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert body["count"] == len(body["tokens"]) == 2 and body["max_model_len"] == 8192
    assert body["token_strs"] == ["Hello", "Ġworld"]
    back = httpx.post(live_server.base_url + "/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert back.json() == {"prompt": "Hello world"}
    without = tokenize(live_server, messages=QUESTION, add_generation_prompt=False)
    assert len(without) < len(ids) and ids[:len(without)] == without


def test_tokenizer_endpoints_refuse_bad_input(live_server):
    url = live_server.base_url
    assert httpx.post(url + "/tokenize", json={"model": "other", "prompt": "x"}).status_code == 404
    bad = httpx.post(url + "/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.post(url + "/tokenize", json={"prompt": 3}).status_code == 400


def test_version(live_server):
    assert httpx.get(live_server.base_url + "/version").json() == {"version": version("axiscap")}
