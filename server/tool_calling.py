"""Tool calling in chat completions: the tools in the prompt, grammars that force a call, and parsers
that find calls in free output.

- ``tool_choice`` ``required`` or a named function: sampling is constrained by a JSON schema built from
  the functions' parameters (``forced_schema``), so even a small model returns valid calls: a named
  function's output is its arguments object; ``required``'s is a list of ``{"name", "arguments"}``.
- ``auto``: the output is free; the parser chosen with ``--tool-call-parser`` (as vLLM's flag) finds
  the calls in it: ``hermes`` (``<tool_call>{"name", "arguments"}</tool_call>``, Hermes and Qwen 2/3
  models) or ``llama3_json`` (a bare ``{"name", "parameters"}`` object, Llama 3.x).
- Chat templates with tool syntax get ``tools`` and the history's calls as they expect them; a template
  without any (SmolLM2, Gemma 2) gets the tools described in the system message and the history's calls
  and results written in the hermes form, so any model can be told about tools.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

TOOL_CALL_PARSERS = ("hermes", "llama3_json")


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    @staticmethod
    def new_id() -> str:
        return f"call_{uuid.uuid4().hex[:24]}"


# --- the prompt -------------------------------------------------------------------------------

def template_knows_tools(chat_template: str | None) -> bool:
    """Whether the model's chat template renders ``tools`` itself (Qwen, Llama 3.1+, Hermes, ...)."""
    return bool(chat_template) and "tools" in chat_template


def render_messages(messages: list[dict[str, Any]], tools: list[dict] | None, native: bool) -> list[dict[str, Any]]:
    """Messages as the chat template takes them. ``messages`` are OpenAI's (``tool_calls`` with JSON-text
    arguments, ``tool`` results). A template with tool syntax (``native``) gets the calls with their
    arguments as objects, as those templates expect; any other gets plain text in the hermes form."""
    if native:
        out = []
        for m in messages:
            if m.get("tool_calls"):
                calls = [{**c, "function": {**c["function"], "arguments": _as_object(c["function"]["arguments"])}}
                         for c in m["tool_calls"]]
                m = {**m, "tool_calls": calls}
            out.append(m)
        return out
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = "\n".join(_hermes_call(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": f"{m.get('content') or ''}{calls}"})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if tools:
        described = _describe(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{described}"}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def _describe(tools: list[dict]) -> str:
    listed = "\n".join(json.dumps(t, separators=(",", ":")) for t in tools)
    return ("You can call functions. Their signatures:\n<tools>\n" + listed + "\n</tools>\n"
            "To call one, answer with a JSON object naming it and its arguments inside tags:\n"
            '<tool_call>\n{"name": "<function name>", "arguments": {<its arguments>}}\n</tool_call>')


def _hermes_call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": {json.dumps(_as_object(arguments))}}}\n</tool_call>'


def _as_object(arguments: str | dict) -> Any:
    if isinstance(arguments, dict):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


# --- forcing a call -----------------------------------------------------------------------------

def forced_schema(functions: list[dict], named: str | None, parallel: bool) -> dict:
    """The JSON schema sampling follows when a call is required: a named function's arguments, or a
    list of calls to any of the functions (one at most unless ``parallel``)."""
    by_name = {f["name"]: f.get("parameters") or {"type": "object"} for f in functions}
    if named is not None:
        return by_name[named]
    one_of = [{"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
               "required": ["name", "arguments"], "additionalProperties": False}
              for name, parameters in by_name.items()]
    listing = {"type": "array", "items": {"anyOf": one_of}, "minItems": 1}
    return listing if parallel else {**listing, "maxItems": 1}


def forced_calls(text: str, named: str | None) -> list[Call]:
    """The calls in output sampled under ``forced_schema`` (it parses, unless cut off by max_tokens)."""
    if named is not None:
        return [Call(named, text.strip())]
    try:
        calls = json.loads(text)
    except ValueError:
        return []
    return [Call(c["name"], json.dumps(c["arguments"])) for c in calls]


# --- finding calls in free output ---------------------------------------------------------------

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_calls(parser: str, text: str, functions: list[dict]) -> tuple[str, list[Call]]:
    """Split ``text`` into content and tool calls. A call must name one of ``functions`` and carry a
    JSON object of arguments; anything else stays content, as the model wrote it."""
    known = {f["name"] for f in functions}
    if parser == "hermes":
        calls, kept, last = [], [], 0
        for match in _HERMES.finditer(text):
            call = _call_from(match.group(1), "arguments", known)
            if call is None:
                continue
            kept.append(text[last:match.start()])
            last = match.end()
            calls.append(call)
        kept.append(text[last:])
        return "".join(kept), calls  # unstripped: a stream has sent a prefix of it already
    if parser == "llama3_json":
        stripped = text.strip().removeprefix("<|python_tag|>")
        call = _call_from(stripped, "parameters", known) if stripped.startswith("{") else None
        return ("", [call]) if call is not None else (text, [])
    raise ValueError(f"unknown tool call parser {parser!r}")


def _call_from(payload: str, arguments_key: str, known: set[str]) -> Call | None:
    try:
        obj = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in known:
        return None
    arguments = obj.get(arguments_key, obj.get("arguments", {}))
    if not isinstance(arguments, dict):
        return None
    return Call(obj["name"], json.dumps(arguments))


def held_from(parser: str, text: str) -> int:
    """Where streamed ``text`` may begin a tool call, so that it is held back from there until the
    output ends: a ``<tool_call>`` tag, or a prefix of one at its end, for hermes; for llama3_json,
    output that starts (after whitespace) with ``{`` or the python tag, or may still grow into it."""
    if parser == "llama3_json":
        head = text.lstrip()
        opens = head.startswith(("{", "<|python_tag|>")) or "<|python_tag|>".startswith(head)
        return 0 if opens else len(text)
    tag = "<tool_call>"
    at = text.find(tag)
    if at >= 0:
        return at
    return next((len(text) - k for k in range(len(tag) - 1, 0, -1) if text.endswith(tag[:k])), len(text))
