"""Property-based fuzzing from the server's own OpenAPI document (schemathesis), bounded for CI:
whatever a client sends, the answer is never a 5xx, and every error is an OpenAI error object."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from .conftest import server

EXAMPLES_PER_OPERATION = 100
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def fuzzed_server(smollm2, smollm2_axis):
    # A short context keeps every generated request fast on a CPU.
    with server(smollm2, smollm2_axis, max_model_len=64, default_max_tokens=8, max_batch_size=4,
                max_waiting=64) as live:
        yield live


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    return schemathesis.openapi.from_url(fuzzed_server.base_url + "/openapi.json")


def test_the_openapi_document_describes_every_body(fuzzed_server):
    import httpx

    document = httpx.get(fuzzed_server.base_url + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"].split("/")[-1] in document["components"]["schemas"]
    chat = document["components"]["schemas"]["ChatCompletionRequest"]
    assert {"messages", "capping", "return_projections", "seed", "tools", "tool_choice"} <= set(chat["properties"])


def test_fuzzed_requests_never_get_a_5xx_or_a_non_openai_error(api_schema, fuzzed_server):
    # Each operation's cases come from its own hypothesis strategy (schemathesis' pytest plugin
    # does not load under this pytest); both valid and invalid bodies are generated.
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models",
                                              "/health"}
    called = []

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = MODEL  # reach the engine, not only the 404 for an unknown model
            response = case.call(base_url=fuzzed_server.base_url, timeout=60)
            called.append(response.status_code)
            assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text[:500]

        fuzz()
    assert len(called) >= 2 * len(operations) and any(400 <= s < 500 for s in called) and 200 in called
