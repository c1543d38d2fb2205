"""Structured output's one policy (``server/engines/grammar.py``): limits, refused keywords, compiles
with a deadline in a worker process, the cache, the metric; and the schema table that both backends
must answer alike (``test_vllm_backend.py`` sends it to the vLLM backend too)."""

from __future__ import annotations

import json
import os
import random
import string

import httpx
import pytest

from axiscap.server.engines import GrammarError
from axiscap.server.engines.grammar import STRING_FORMATS, SchemaLimits, check_schema, client_reason

from .conftest import assert_openai_error, server
from .metrics_mix import scrape

MODEL = "smollm2-135m-instruct"


def nested_schema(depth: int) -> dict:
    """Objects and arrays nested ``depth`` levels deep, counted as vLLM counts them (the schema document's)."""
    schema: dict = {"type": "integer"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema}
    return schema


def enum_schema(n: int, seed: int = 0) -> dict:
    rnd = random.Random(seed)
    return {"type": "string", "enum": ["".join(rnd.choices(string.ascii_lowercase, k=16)) for _ in range(n)]}


def depth_of(value) -> int:
    """The nesting depth of a JSON document, directly (recursion: the test's own count)."""
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0


# --- the policy, on schemas alone ---------------------------------------------------------------

def test_depth_is_counted_as_vllm_counts_it():
    limits = SchemaLimits()
    assert depth_of(nested_schema(64)) == 64 and depth_of(nested_schema(65)) == 65
    check_schema(json.dumps(nested_schema(64)), limits)
    with pytest.raises(GrammarError, match=r"more than 64 levels deep \(--max-schema-depth\)"):
        check_schema(json.dumps(nested_schema(65)), limits)
    with pytest.raises(GrammarError, match="--max-schema-depth"):
        check_schema(json.dumps(nested_schema(10)), SchemaLimits(max_depth=9))


def test_enum_values_count_over_the_whole_schema():
    two_halves = {"type": "object", "properties": {"a": enum_schema(600, 1), "b": enum_schema(400, 2),
                                                    "c": {"const": "x"}}}
    with pytest.raises(GrammarError, match=r"more than 1000 enum and const values \(--max-schema-enum-values\)"):
        check_schema(json.dumps(two_halves), SchemaLimits(max_bytes=10**6))  # 600 + 400 + 1 const
    del two_halves["properties"]["c"]
    check_schema(json.dumps(two_halves), SchemaLimits(max_bytes=10**6))  # exactly 1000
    # A property named "enum" is a name, not the keyword.
    check_schema(json.dumps({"type": "object", "properties": {"enum": {"type": "string"}}}),
                 SchemaLimits(max_enum_values=0))


def test_size_is_checked_first_and_names_its_flag():
    text = json.dumps(enum_schema(20000))
    with pytest.raises(GrammarError) as refused:
        check_schema(text, SchemaLimits())
    assert f"{len(text)} bytes" in str(refused.value) and "--max-schema-bytes" in str(refused.value)


UNSUPPORTED = [
    ({"type": "number", "multipleOf": 3}, "'multipleOf' on a number", "#"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "'uniqueItems' on an array", "#"),
    ({"type": "object", "properties": {"d": {"type": "string", "format": "x-never-heard"}}},
     'the string format "x-never-heard"', "#/properties/d"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 4}, "'minLength' or 'maxLength' beside a pattern", "#"),
    ({"type": "object", "propertyNames": {"pattern": "^a"}, "properties": {"a": {"type": "integer"}}},
     "'propertyNames' beside properties", "#"),
    ({"type": "object", "patternProperties": {"^a": {}, "^b": {}}}, "'patternProperties' beside properties, or more",
     "#"),
    ({"allOf": [{"type": "string"}, {"enum": ["yes", "no"]}]}, "'allOf' with more than one schema", "#"),
    ({"type": ["string", "null"], "format": "colour"}, 'the string format "colour"', "#"),
    ({"type": "string", "format": ["date"]}, 'the string format ["date"]', "#"),  # not even a string
]


@pytest.mark.parametrize("schema, what, where", UNSUPPORTED, ids=[u[1][:30] for u in UNSUPPORTED])
def test_a_constraint_xgrammar_would_drop_is_refused_where_it_stands(schema, what, where):
    with pytest.raises(GrammarError) as refused:
        check_schema(json.dumps(schema), SchemaLimits())
    assert what in str(refused.value) and str(refused.value).endswith(f"is not supported (at {where})")


@pytest.mark.parametrize("schema", [
    *({"type": "string", "format": f} for f in sorted(STRING_FORMATS)),
    {"type": "integer", "minimum": 0, "maximum": 9},
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    {"type": "string", "pattern": "^[a-z]+$"},
    {"allOf": [{"type": "string"}]},
    {"type": "object", "properties": {"format": {"type": "string"}, "multipleOf": {"type": "number"}}},
], ids=lambda s: json.dumps(s)[:40])
def test_what_xgrammar_enforces_passes(schema):
    check_schema(json.dumps(schema), SchemaLimits())


def test_an_internal_assertion_never_reaches_a_client():
    internal = ("[14:28:13] /project/cpp/grammar_functor.cc:3567: Check failed: (grammar_->ImplPtr()->"
                "per_rule_fsm_hashes[ref_rule_id].has_value()) is false: ")
    assert "Check failed" not in client_reason(internal) and "simplify the schema" in client_reason(internal)
    assert client_reason('[10:00:00] /project/cpp/json_schema_converter.cc:12: Unsupported type "nope"') == \
        'Unsupported type "nope"'


# --- the schema table: what both backends answer ------------------------------------------------

def _format(schema: dict | None) -> dict:
    return {"type": "json_object"} if schema is None else \
        {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


# (id, response_format's schema (None: json_object), the status both backends give, what a 400 says)
SCHEMA_TABLE = [
    ("boolean", {"type": "boolean"}, 200, None),
    ("small integer array", {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                             "minItems": 2, "maxItems": 3}, 200, None),
    ("object with an enum", {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"]}, 200, None),
    ("date format", {"type": "string", "format": "date"}, 200, None),
    ("json_object", None, 200, None),
    ("unknown format", {"type": "string", "format": "x-never-heard"}, 400, 'the string format "x-never-heard"'),
    ("counted repetitions", {"type": "string", "pattern": "^(a{1,200}b{1,200}){1,50}$"}, 400, "simplify the schema"),
    ("nested 200 deep", nested_schema(200), 400, "--max-schema-depth"),
    ("enum of 20000", enum_schema(20000), 400, "--max-schema-bytes"),
    ("enum of 1500", enum_schema(1500), 400, "--max-schema-enum-values"),
    ("multipleOf", {"type": "integer", "multipleOf": 5}, 400, "'multipleOf' on a number"),
    ("unknown type", {"type": "nope"}, 400, 'Unsupported type "nope"'),
]


def table_request(schema: dict | None) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Answer in JSON: is Paris in France?"}],
            "max_tokens": 24, "temperature": 0, "capping": True, "response_format": _format(schema)}


def ask_table(base_url: str) -> dict[str, tuple[int, str]]:
    """{id: (status, the answer's text or the error's message)} for every row of the table."""
    answers = {}
    for name, schema, _, _ in SCHEMA_TABLE:
        r = httpx.post(f"{base_url}/v1/chat/completions", json=table_request(schema), timeout=120)
        body = r.json()
        answers[name] = (r.status_code, body["choices"][0]["message"]["content"] if r.status_code == 200
                         else body["error"]["message"])
    return answers


def check_table(answers: dict[str, tuple[int, str]]) -> None:
    for name, _, status, says in SCHEMA_TABLE:
        got, text = answers[name]
        assert got == status, (name, text)
        if status == 400:
            assert says in text and "Check failed" not in text, (name, text)
        else:
            assert "\n" not in text, (name, text)  # compact JSON, as the README promises


@pytest.fixture(scope="module")
def strict_server(smollm2, smollm2_axis):
    """Limits raised past the enum and size checks, and a deadline far below a 50,000-value enum's compile
    (several CPU seconds) yet far above a small schema's (milliseconds)."""
    with server(smollm2, smollm2_axis, grammar_compile_timeout=0.5, max_schema_enum_values=10**6,
                max_schema_bytes=4 * 2**20, max_body_bytes=8 * 2**20) as live:
        yield live


def compiles(samples: dict, outcome: str) -> float:
    return samples.get(("axiscap_grammar_compile_seconds_count", (("model", MODEL), ("outcome", outcome))), 0.0)


def test_the_schema_table_on_the_built_in_engine(live_server):
    check_table(ask_table(live_server.base_url))


def test_a_compile_past_the_deadline_is_a_400_and_its_worker_is_replaced(strict_server):
    url = strict_server.base_url
    before = scrape(url)
    error = assert_openai_error(httpx.post(f"{url}/v1/chat/completions", json=table_request(enum_schema(50000, 7)),
                                           timeout=120), 400, "response_format")
    assert "more than 0.5 s to compile (--grammar-compile-timeout)" in error["message"]
    middle = scrape(url)
    assert compiles(middle, "timeout") == compiles(before, "timeout") + 1
    # The same schema again is answered from the cache: no second compile, no second wait.
    assert_openai_error(httpx.post(f"{url}/v1/chat/completions", json=table_request(enum_schema(50000, 7)),
                                   timeout=120), 400, "response_format")
    after = scrape(url)
    assert compiles(after, "timeout") == compiles(middle, "timeout")
    assert after[("axiscap_grammar_cache_hits_total", (("model", MODEL),))] == \
        middle[("axiscap_grammar_cache_hits_total", (("model", MODEL),))] + 1
    # The next schema compiles in a fresh worker, another process than the server's.
    response = httpx.post(f"{url}/v1/chat/completions", json=table_request({"type": "boolean"}), timeout=120)
    assert response.status_code == 200, response.text
    assert json.loads(response.json()["choices"][0]["message"]["content"]) in (True, False)
    assert compiles(scrape(url), "ok") == compiles(after, "ok") + 1
    (worker,) = strict_server.state.engine.grammars._pool._workers
    assert worker._process.poll() is None and worker._process.pid != os.getpid()


def test_the_worker_stops_with_the_server(smollm2, smollm2_axis):
    with server(smollm2, smollm2_axis) as live:
        response = httpx.post(f"{live.base_url}/v1/chat/completions", json=table_request({"type": "boolean"}),
                              timeout=120)
        assert response.status_code == 200, response.text
        (worker,) = live.state.engine.grammars._pool._workers
        process = worker._process
        assert process.poll() is None
    assert process.poll() is not None  # killed and reaped when the engine stopped


def test_a_worker_that_died_is_replaced_at_the_next_schema(live_server):
    first = httpx.post(f"{live_server.base_url}/v1/chat/completions", json=table_request({"type": "integer"}),
                       timeout=120)
    assert first.status_code == 200, first.text
    (worker,) = live_server.state.engine.grammars._pool._workers
    dead = worker._process
    dead.kill()
    dead.wait()
    response = httpx.post(f"{live_server.base_url}/v1/chat/completions",
                          json=table_request({"type": "array", "items": {"type": "boolean"}, "maxItems": 2}),
                          timeout=120)
    assert response.status_code == 200, response.text
    assert worker._process is not dead and worker._process.poll() is None


def test_a_worker_that_dies_mid_compile_fails_that_request_alone_and_is_not_cached(smollm2):
    import asyncio

    from axiscap.server.engines.grammar import GrammarCompiler

    grammars = GrammarCompiler(smollm2.tokenizer, smollm2.vocab_size,
                               SchemaLimits(max_enum_values=10**4, compile_timeout=60.0))
    schema = json.dumps(enum_schema(3000, 11))  # about 2 CPU seconds: still compiling when the worker dies

    async def scenario():
        await grammars.compile("json_schema", '{"type": "boolean"}')  # the worker is up
        (worker,) = grammars._pool._workers
        compiling = asyncio.ensure_future(grammars.compile("json_schema", schema))
        await asyncio.sleep(0.3)
        worker._process.kill()
        with pytest.raises(GrammarError, match="worker process ended"):
            await compiling
        return await grammars.compile("json_schema", schema)  # asked again: compiled, not the cached failure

    try:
        assert asyncio.run(scenario()) is not None
    finally:
        grammars.stop()
