"""Tool calling in chat completions: the prompt, forced calls under a grammar, parsed calls, streaming,
through the official openai SDK against the real SmolLM2 server."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import httpx
import openai
import pytest

from axiscap.server.chat_template import ChatPrompt
from axiscap.server.serving_chat import ChatShape
from axiscap.server.serving_engine import ChoiceText
from axiscap.server.protocol import ChatCompletionRequest
from axiscap.server.tool_calling import (Call, forced_calls, forced_schema, held_from, parse_calls, render_messages,
                                         template_knows_tools)

from .conftest import assert_openai_error

MODEL = "smollm2-135m-instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                   "required": ["a", "b"]}}}
FUNCTIONS = [WEATHER["function"], ADD["function"]]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


# --- the parts, without a model ------------------------------------------------------------------

def test_hermes_calls_are_found_and_anything_else_stays_content():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')
    content, calls = parse_calls("hermes", text, FUNCTIONS)
    assert content.strip() == "Let me check."
    assert calls == [Call("get_weather", '{"city": "Paris"}'), Call("add", '{"a": 1, "b": 2}')]
    for not_a_call in ['<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # not an offered function
                       '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',  # arguments not an object
                       '<tool_call>{"name": "add", </tool_call>', "plain text"]:
        assert parse_calls("hermes", not_a_call, FUNCTIONS) == (not_a_call, [])


def test_llama3_json_calls_are_found():
    assert parse_calls("llama3_json", ' {"name": "add", "parameters": {"a": 1, "b": 2}}', FUNCTIONS) == \
        ("", [Call("add", '{"a": 1, "b": 2}')])
    assert parse_calls("llama3_json", "The answer is 3.", FUNCTIONS) == ("The answer is 3.", [])


def test_streamed_text_is_held_back_only_where_a_call_may_begin():
    assert held_from("hermes", "Sure, let me look") == len("Sure, let me look")
    assert held_from("hermes", "Sure <tool") == len("Sure ")  # may grow into the tag
    assert held_from("hermes", "Sure <tool_call>{") == len("Sure ")
    assert held_from("hermes", "a < b") == len("a < b")
    assert held_from("llama3_json", '  {"na') == 0 and held_from("llama3_json", "Hello") == 5


def test_forced_schemas_and_their_outputs():
    named = forced_schema(FUNCTIONS, "add", parallel=True)
    assert named == ADD["function"]["parameters"]
    one = forced_schema(FUNCTIONS, None, parallel=False)
    assert one["type"] == "array" and one["minItems"] == 1 and one["maxItems"] == 1
    assert [o["properties"]["name"]["const"] for o in one["items"]["anyOf"]] == ["get_weather", "add"]
    assert "maxItems" not in forced_schema(FUNCTIONS, None, parallel=True)
    assert forced_calls('[{"name": "add", "arguments": {"a": 1, "b": 2}}]', None) == [Call("add", '{"a": 1, "b": 2}')]
    assert forced_calls('{"a": 1', "add") == [Call("add", '{"a": 1')]  # cut off by max_tokens: as generated
    assert forced_calls('[{"name": "add", "argu', None) == []


def test_a_template_without_tool_syntax_is_told_in_the_hermes_form():
    history = [{"role": "system", "content": "Be brief."}, *ASK,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    rendered = render_messages(history, [WEATHER], native=False)
    assert rendered[0]["role"] == "system" and rendered[0]["content"].startswith("Be brief.\n\nYou can call functions")
    assert '"name":"get_weather"' in rendered[0]["content"]
    assert rendered[2] == {"role": "assistant", "content":
                           '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'}
    assert rendered[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    native = render_messages(history, [WEATHER], native=True)
    assert native[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}  # as such templates expect
    assert not template_knows_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert template_knows_tools("{% if tools %}{{ tools | tojson }}{% endif %}")


def test_request_checks():
    def body(**fields):
        return ChatCompletionRequest(model=MODEL, messages=ASK, **fields)

    assert body(tools=[WEATHER]).tool_mode() == ("auto", None)
    assert body(tools=[WEATHER], tool_choice="none").tool_mode() == ("none", None)
    assert body().tool_mode() == ("none", None)
    with pytest.raises(ValueError, match="not among the tools"):
        body(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "add"}})
    with pytest.raises(ValueError, match="requires tools"):
        body(tool_choice="required")
    with pytest.raises(ValueError, match="a tool message needs 'tool_call_id'"):
        ChatCompletionRequest(model=MODEL, messages=[*ASK, {"role": "tool", "content": "sunny"}])
    with pytest.raises(ValueError, match="unique"):
        body(tools=[WEATHER, WEATHER])
    with pytest.raises(ValueError, match="same output"):
        body(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"})


# --- the real server, through the SDK -------------------------------------------------------------

@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0)


def create(client, **fields):
    return client.chat.completions.create(model=MODEL, max_tokens=40, temperature=0, **fields)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_named_function_is_called_with_arguments_that_fit_its_schema(client, stream):
    choice = {"type": "function", "function": {"name": "add"}}
    messages = [{"role": "user", "content": "What is 2 plus 3?"}]
    if not stream:
        reply = create(client, messages=messages, tools=[WEATHER, ADD], tool_choice=choice,
                       extra_body={"capping": True, "return_projections": True})
        message, finish = reply.choices[0].message, reply.choices[0].finish_reason
        calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls]
        assert message.content is None
        assert len(reply.to_dict()["choices"][0]["axis_projections"]) == reply.usage.completion_tokens
    else:
        chunks = list(create(client, messages=messages, tools=[WEATHER, ADD], tool_choice=choice, stream=True))
        deltas = [d for ch in chunks if ch.choices for d in ch.choices[0].delta.tool_calls or []]
        assert deltas[0].id and deltas[0].function.name == "add" and all(d.index == 0 for d in deltas)
        calls = [(deltas[0].id, "add", "".join(d.function.arguments or "" for d in deltas))]
        finish = chunks[-1].choices[0].finish_reason
    assert finish == "tool_calls"
    (call_id, name, arguments), = calls
    assert call_id.startswith("call_") and name == "add"
    args = json.loads(arguments)
    assert set(args) == {"a", "b"} and all(isinstance(v, (int, float)) for v in args.values())


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_required_returns_one_call_to_an_offered_function(client, stream):
    if stream:
        chunks = list(create(client, messages=ASK, tools=[WEATHER, ADD], tool_choice="required", stream=True,
                             parallel_tool_calls=False))
        deltas = [d for ch in chunks if ch.choices for d in ch.choices[0].delta.tool_calls or []]
        calls = [(d.function.name, d.function.arguments) for d in deltas]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
    else:
        reply = create(client, messages=ASK, tools=[WEATHER, ADD], tool_choice="required", parallel_tool_calls=False)
        assert reply.choices[0].finish_reason == "tool_calls"
        calls = [(c.function.name, c.function.arguments) for c in reply.choices[0].message.tool_calls]
    assert len(calls) == 1
    name, arguments = calls[0]
    required = {"get_weather": {"city"}, "add": {"a", "b"}}[name]
    assert required <= set(json.loads(arguments))


def test_auto_without_a_call_answers_in_text(client):
    reply = create(client, messages=[{"role": "user", "content": "Say hello."}], tools=[WEATHER])
    message = reply.choices[0].message
    assert message.content and message.tool_calls is None and reply.choices[0].finish_reason in ("stop", "length")


def test_streamed_auto_output_holds_back_calls_and_sends_them_whole(live_server):
    """The streaming side of ``auto``, fed the deltas a model would produce (the 135M model seldom
    calls on its own): content streams up to the tag, the call arrives whole at the end."""
    body = ChatCompletionRequest(model=MODEL, messages=ASK, tools=[WEATHER])
    shape = ChatShape(live_server.state.chat, body, ChatPrompt([1], None))
    pieces = ["Let me ", "check. <tool", '_call>{"name": "get_weather", ', '"arguments": {"city": "Paris"}}</tool_call>']
    deltas = []
    for k, piece in enumerate(pieces):
        out = ChoiceText(0, text=piece, finish_reason="stop" if k == len(pieces) - 1 else None)
        deltas.append(shape.choice(out, first=k == 0, streaming=True))
    content = "".join(d.delta.content or "" for d in deltas)
    assert content == "Let me check. "
    assert [d.delta.tool_calls for d in deltas[:-1]] == [None, None, None]
    (call,) = deltas[-1].delta.tool_calls
    assert (call.index, call.function.name, call.function.arguments) == (0, "get_weather", '{"city": "Paris"}')
    assert deltas[-1].finish_reason == "tool_calls"


def test_tool_errors_are_openai_errors(live_server):
    url = live_server.base_url + "/v1/chat/completions"
    bad_schema = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "no-such-type"}}}}}
    cases = [
        ({"tools": [bad_schema], "tool_choice": "required"}, "tools"),
        ({"tools": [bad_schema]}, "tools"),  # auto: checked all the same
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "add"}}}, None),
        ({"tool_choice": "required"}, None),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, None),
        ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, None),
    ]
    for fields, param in cases:
        r = httpx.post(url, json={"model": MODEL, "messages": ASK, "max_tokens": 4, **fields}, timeout=60)
        error = assert_openai_error(r, 400)
        if param:
            assert error["param"] == param, error


def test_the_api_docs_agent_loop_runs(live_server, capsys, monkeypatch):
    readme = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    block = re.search(r"An agent loop against `make serve`.*?```python\n(.*?)```", readme, re.DOTALL).group(1)
    monkeypatch.setenv("AXISCAP_URL", live_server.base_url + "/v1")
    exec(compile(block, "docs/api.md agent loop", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.strip()  # the final answer, after the tool's result
    assert os.environ["AXISCAP_URL"].startswith("http://127.0.0.1:")


def test_streamed_auto_output_keeps_text_around_a_call_whole(live_server):
    """Leading whitespace and text after the call: what streams as content, plus what comes at the end,
    is the output with the call taken out, character for character."""
    body = ChatCompletionRequest(model=MODEL, messages=ASK, tools=[WEATHER])
    shape = ChatShape(live_server.state.chat, body, ChatPrompt([1], None))
    pieces = ["  Checking", ' <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>', " done."]
    deltas = [shape.choice(ChoiceText(0, text=piece, finish_reason="stop" if k == 2 else None), first=k == 0,
                           streaming=True) for k, piece in enumerate(pieces)]
    assert "".join(d.delta.content or "" for d in deltas) == "  Checking  done."
    assert deltas[-1].delta.tool_calls[0].function.arguments == '{"city": "Oslo"}'
