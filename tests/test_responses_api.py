"""POST /v1/responses through the official openai SDK (``client.responses.create``), streamed and not,
every body and event revalidated against the SDK's own types."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from axiscap.server.serving_responses import ResponseStore

from .conftest import assert_openai_error

MODEL = "smollm2-135m-instruct"
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
EVENT = TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0)


def create(client, **fields):
    return client.responses.create(model=MODEL, temperature=0, **{"max_output_tokens": 12, **fields})


def valid(response) -> Response:
    return Response.model_validate(response.to_dict())


def test_a_text_response_with_axiscaps_extensions(client):
    r = valid(create(client, input="Name a colour.", instructions="Answer in one word.",
                     extra_body={"capping": True, "return_projections": True}))
    assert r.object == "response" and r.id.startswith("resp-") and r.status in ("completed", "incomplete")
    assert r.output_text and r.output[0].type == "message" and r.output[0].content[0].type == "output_text"
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 12
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    extra = r.to_dict()
    assert extra["capping"] is True and len(extra["axis_projections"]) == r.usage.output_tokens
    assert r.instructions == "Answer in one word." and r.max_output_tokens == 12


def test_the_same_greedy_answer_as_chat_completions(client, live_server):
    """One prompt, one engine: the Responses API is the chat endpoint in another shape."""
    r = create(client, input="Name a colour.", instructions="Answer briefly.", max_output_tokens=8)
    chat = openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="unused").chat.completions.create(
        model=MODEL, temperature=0, max_tokens=8,
        messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}])
    assert r.output_text == chat.choices[0].message.content
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")


def test_streamed_events_come_in_order_and_add_up(client):
    events = [EVENT.validate_python(e.to_dict()) for e in create(client, input="Name a colour.", stream=True)]
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert text and final.output_text == text == events[-4].text
    assert final.usage.output_tokens == 12 or final.status == "completed"


def test_a_conversation_continues_from_a_stored_response(client, live_server):
    first = create(client, input="My name is Ada. Say hi.")
    second = create(client, input="What is my name?", previous_response_id=first.id, max_output_tokens=16)
    assert second.previous_response_id == first.id
    # The continuation's prompt holds the first turn: it is longer than the question alone.
    alone = create(client, input="What is my name?", max_output_tokens=16)
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    # Not stored, or another key's: not found.
    unstored = create(client, input="hi", store=False)
    with pytest.raises(openai.NotFoundError, match="not found"):
        create(client, input="again", previous_response_id=unstored.id)
    other = httpx.post(live_server.base_url + "/v1/responses", headers={"Authorization": "Bearer someone-else"},
                       json={"model": MODEL, "input": "x", "previous_response_id": first.id})
    assert_openai_error(other, 404, "previous_response_id")


def test_the_store_is_bounded_and_keeps_the_most_recent():
    store = ResponseStore(max_chars=300)
    for k in range(10):
        store.put(f"r{k}", "me", [{"role": "user", "content": "x" * 30}], {"id": f"r{k}"})
    assert store.chars <= 300 and store.messages("r9", "me") and store.response("r9", "me") == {"id": "r9"}
    with pytest.raises(Exception, match="not found"):
        store.messages("r0", "me")
    kept = store.chars
    store.delete("r9", "me")
    assert store.chars < kept
    with pytest.raises(Exception, match="not found"):
        store.response("r9", "me")


def test_a_stored_response_is_retrieved_and_deleted_by_its_owner_alone(client, live_server):
    made = create(client, input="Name a colour.")
    got = client.responses.retrieve(made.id)
    assert got.to_dict() == made.to_dict()  # the same response object, as OpenAI's GET returns it
    url, theirs = f"{live_server.base_url}/v1/responses/{made.id}", {"Authorization": "Bearer someone-else"}
    assert_openai_error(httpx.get(url, headers=theirs), 404)
    assert_openai_error(httpx.delete(url, headers=theirs), 404)
    mine = {"Authorization": "Bearer unused"}  # the client's key
    assert httpx.delete(url, headers=mine).json() == {"id": made.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        create(client, input="again", previous_response_id=made.id)
    unstored = create(client, input="hi", store=False)
    assert_openai_error(httpx.get(f"{live_server.base_url}/v1/responses/{unstored.id}", headers=mine), 404)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_function_tools_forced_and_the_loop_back(client, stream):
    if stream:
        events = [EVENT.validate_python(e.to_dict()) for e in create(
            client, input="Weather in Paris?", tools=[WEATHER], stream=True, max_output_tokens=40,
            tool_choice={"type": "function", "name": "get_weather"})]
        kinds = [e.type for e in events]
        assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
        output = events[-1].response.output
    else:
        output = valid(create(client, input="Weather in Paris?", tools=[WEATHER], tool_choice="required",
                              max_output_tokens=40)).output
    (call,) = [o for o in output if o.type == "function_call"]
    assert call.name == "get_weather" and "city" in json.loads(call.arguments) and call.call_id.startswith("call_")
    answer = valid(create(client, tools=[WEATHER], max_output_tokens=16, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}]))
    assert answer.output_text


def test_json_schema_text_format(client):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    r = create(client, input="Name a city as JSON.", max_output_tokens=30,
               text={"format": {"type": "json_schema", "name": "city", "schema": schema}})
    assert r.status == "completed" and "city" in json.loads(r.output_text)


def test_a_long_text_input_is_one_message_and_many_items_are_refused(client, live_server):
    long = "Tell me about lighthouses. " * 40  # over 512 characters: a text is not bounded like the item list
    assert create(client, input=long, max_output_tokens=2).usage.input_tokens > 200
    items = [{"role": "user", "content": "hi"}] * 513
    error = assert_openai_error(httpx.post(live_server.base_url + "/v1/responses",
                                           json={"model": MODEL, "input": items}, timeout=60), 400)
    assert "512" in error["message"]


def test_errors_are_openai_errors(live_server):
    url = live_server.base_url + "/v1/responses"
    cases = [({"input": "hi", "tools": [{"type": "web_search"}]}, None),
             ({"input": "hi", "tool_choice": "required"}, None),
             ({"input": "hi", "max_output_tokens": 100_000}, "max_output_tokens"),
             ({"input": "hi", "text": {"format": {"type": "json_schema", "schema": {"type": "nope"}}}}, "text.format"),
             ({"input": [{"role": "tool", "content": "x"}]}, None)]
    for fields, param in cases:
        error = assert_openai_error(httpx.post(url, json={"model": MODEL, **fields}, timeout=60), 400)
        if param:
            assert error["param"] == param, error
