"""Structured output (``response_format``, forced tool calls): the one policy both backends follow.

Every JSON schema a client sends goes through ``GrammarCompiler.compile`` before any engine sees
it, whichever backend serves:

1. **Limits** (``SchemaLimits``, the ``--max-schema-*`` flags): size in bytes, enum values, and
   nesting depth, checked on the parsed schema in microseconds, each refused with a 400 that names
   its flag. A compile's cost grows with them (xgrammar precomputes a token mask per grammar state).
2. **Supported keywords**: a schema whose constraints xgrammar would silently drop (``multipleOf``,
   ``uniqueItems``, an unknown string ``format``, ...) is refused, naming the keyword and where it
   stands, rather than answered with JSON that ignores it. vLLM's xgrammar backend refuses the same
   set, so both backends accept and refuse the same schemas.
3. **A compile with a deadline**, in a worker process of a small pool (``grammar_pool``): compiles
   queue there instead of taking every core, and one past ``--grammar-compile-timeout`` CPU seconds
   is killed and answered 400. Results (compiled grammars and refusals alike) are cached by the
   schema's text.

The xgrammar settings live here once (``JSON_OPTIONS``); the vLLM engine starts vLLM's xgrammar
backend with the same ones (``vllm_structured_outputs_config``), so a greedy answer under a schema
is the same text on both backends: compact JSON, no free whitespace (which lets a small model
wander into endless newlines).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import xgrammar as xgr
from transformers import PreTrainedTokenizerBase

from .base import GrammarError, StatLogger
from .grammar_pool import CompileFailed, CompilePool, CompileTimedOut

log = logging.getLogger(__name__)

# How xgrammar turns a JSON schema into a grammar, on both backends.
JSON_OPTIONS: dict[str, Any] = {"any_whitespace": False, "separators": (",", ":"), "strict_mode": True}
JSON_OBJECT_SCHEMA = '{"type": "object"}'

# The string formats xgrammar turns into a grammar; any other it would ignore.
STRING_FORMATS = frozenset({"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid",
                            "uri", "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"})
ARRAY_KEYWORDS_IGNORED = ("uniqueItems", "contains", "minContains", "maxContains")
# Depth vLLM's own request check allows (vllm.sampling_params.MAX_STRUCTURED_OUTPUT_JSON_NESTING).
VLLM_MAX_DEPTH = 64


@dataclass(frozen=True)
class SchemaLimits:
    """What one schema may cost; the ``serve`` flags of the same names set them."""

    max_bytes: int = 128 * 1024
    max_enum_values: int = 1000  # enum members and consts, over the whole schema
    max_depth: int = VLLM_MAX_DEPTH  # objects and arrays nested in the schema document
    compile_timeout: float = 5.0  # CPU seconds one compile may take in its worker
    compile_workers: int = 1  # worker processes compiling at once
    cache_bytes: int = 256 * 1024 * 1024  # compiled grammars kept (and refusals), least recently used dropped


def vllm_structured_outputs_config() -> dict[str, Any]:
    """vLLM's ``structured_outputs_config`` that compiles as ``JSON_OPTIONS`` does: xgrammar alone (no
    fallback to another library, which would accept what this policy refuses), no free whitespace
    (vLLM then passes the compact separators itself)."""
    return {"backend": "xgrammar", "disable_any_whitespace": True}


def check_schema(text: str, limits: SchemaLimits) -> None:
    """Raise GrammarError, for a client to read, where the schema is over a limit or asks for a
    constraint xgrammar would drop. ``text`` is the schema's JSON."""
    size = len(text.encode())
    if size > limits.max_bytes:
        raise GrammarError(f"the JSON schema is {size} bytes; this server accepts at most {limits.max_bytes} "
                           f"(--max-schema-bytes)")
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError):
        raise GrammarError(f"the JSON schema nests deeper than {limits.max_depth} levels (--max-schema-depth)") \
            from None
    enum_values, depth = 0, 0
    level: list[tuple[str, Any]] = [("#", schema)]
    while level:  # breadth first, a level of nesting at a time (as vLLM counts depth)
        depth += 1
        if depth > limits.max_depth:
            raise GrammarError(f"the JSON schema nests objects and arrays more than {limits.max_depth} levels deep "
                               f"(--max-schema-depth)")
        children = []
        for path, node in level:
            if isinstance(node, dict):
                _check_keywords(node, path)
                if isinstance(node.get("enum"), list):
                    enum_values += len(node["enum"])
                enum_values += "const" in node
                items = [(f"{path}/{key}", value) for key, value in node.items()]
            else:
                items = [(f"{path}/{i}", value) for i, value in enumerate(node)]
            children += [(p, v) for p, v in items if isinstance(v, (dict, list))]
        if enum_values > limits.max_enum_values:
            raise GrammarError(f"the JSON schema lists more than {limits.max_enum_values} enum and const values "
                               f"(--max-schema-enum-values)")
        level = children


def _types(node: dict) -> set[str]:
    kind = node.get("type")
    return {kind} if isinstance(kind, str) else {k for k in kind if isinstance(k, str)} if isinstance(kind, list) \
        else set()


def _bounded_text(node: dict) -> bool:
    """A pattern or format with a length bound: xgrammar would keep one and drop the other."""
    return ("pattern" in node or "format" in node) and ("minLength" in node or "maxLength" in node)


def _unsupported(node: dict) -> str | None:
    """What of this schema node xgrammar would not enforce, in a client's words; None if nothing."""
    types = _types(node)
    if types & {"integer", "number"} and "multipleOf" in node:
        return "'multipleOf' on a number"
    if "array" in types and (key := next((k for k in ARRAY_KEYWORDS_IGNORED if k in node), None)):
        return f"'{key}' on an array"
    if "string" in types and "format" in node and not (isinstance(node["format"], str)
                                                         and node["format"] in STRING_FORMATS):
        return f"the string format {json.dumps(node['format'])} (supported: {', '.join(sorted(STRING_FORMATS))})"
    if "string" in types and _bounded_text(node):
        return "'minLength' or 'maxLength' beside a pattern or format"
    if "object" in types and "propertyNames" in node and (
            "properties" in node or "patternProperties" in node or node.get("unevaluatedProperties", True) is not True
            or isinstance(node["propertyNames"], dict) and _bounded_text(node["propertyNames"])):
        return "'propertyNames' beside properties, patternProperties, unevaluatedProperties or a bounded pattern"
    if "object" in types and isinstance(node.get("patternProperties"), dict) and (
            "properties" in node or len(node["patternProperties"]) > 1):
        return "'patternProperties' beside properties, or more than one pattern"
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
        return "'allOf' with more than one schema"
    return None


def _check_keywords(node: dict, path: str) -> None:
    if what := _unsupported(node):
        raise GrammarError(f"the JSON schema cannot be used: {what} is not supported (at {path})")


def client_reason(message: str) -> str:
    """xgrammar's refusal as a client should read it: without its log prefix, and never an internal
    assertion's text."""
    reason = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", message).strip()
    if "Check failed" in reason or "ImplPtr" in reason or not reason:
        return "the grammar compiler could not build a grammar for it; simplify the schema"
    return reason


class GrammarCompiler:
    """Compiles response formats for one tokenizer under ``SchemaLimits``.

    ``keep_compiled``: the built-in engine samples under the compiled grammar, so it is sent back from
    the worker; the vLLM engine only needs to know that vLLM's own compile of the same schema, with the
    same settings, will succeed within the deadline (``compile`` then returns None)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, limits: SchemaLimits = SchemaLimits(),
                 stats: StatLogger | None = None, keep_compiled: bool = True):
        # vocab_size is the logits' width, which may exceed the tokenizer's own (padded embeddings).
        self._info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.limits, self.keep_compiled, self._stats = limits, keep_compiled, stats
        self._pool = CompilePool(self._info.serialize_json(), limits.compile_workers, limits.compile_timeout)
        self._cache: OrderedDict[str, xgr.CompiledGrammar | GrammarError | None] = OrderedDict()
        self._cache_bytes = 0
        self._compiling: dict[str, asyncio.Future] = {}  # one compile for identical schemas asked at once

    def stop(self) -> None:
        self._pool.stop()

    async def compile(self, kind: str, schema: str | None = None) -> xgr.CompiledGrammar | None:
        """``kind`` is response_format.type: "text" (no grammar), "json_object" or "json_schema"
        (``schema`` then holds the JSON schema's text). Raises GrammarError for a client to read."""
        if kind == "text":
            return None
        text = JSON_OBJECT_SCHEMA if kind == "json_object" else schema or ""
        if text in self._cache:
            self._cache.move_to_end(text)
            self._observe("cached")
            return self._result(self._cache[text])
        if text not in self._compiling:
            self._compiling[text] = asyncio.ensure_future(self._compile(text))
            self._compiling[text].add_done_callback(lambda _: self._compiling.pop(text, None))
        # Shielded: a client that leaves does not cancel a compile others may be waiting on.
        return self._result(await asyncio.shield(self._compiling[text]))

    async def _compile(self, text: str) -> xgr.CompiledGrammar | GrammarError | None:
        try:
            check_schema(text, self.limits)
        except GrammarError as exc:
            return self._keep(text, exc)  # no compile: nothing to time
        try:
            serialized, seconds = await self._pool.compile(text, JSON_OPTIONS, self.keep_compiled)
            # Megabytes for a large enum: off the event loop.
            outcome, result = "ok", (await asyncio.to_thread(xgr.CompiledGrammar.deserialize_json, serialized,
                                                             self._info) if serialized is not None else None)
        except CompileTimedOut as exc:
            outcome, seconds, result = "timeout", exc.seconds, GrammarError(
                f"the JSON schema took more than {self.limits.compile_timeout:g} s to compile "
                f"(--grammar-compile-timeout); simplify it")
            log.warning("a JSON schema of %d bytes did not compile in %g s; its worker was stopped",
                        len(text), self.limits.compile_timeout)
        except CompileFailed as exc:
            outcome, seconds = "error", exc.seconds
            result = GrammarError(f"the JSON schema cannot be used: {client_reason(str(exc))}")
            if exc.worker_died:  # not the schema's verdict: the next asking compiles it again
                self._observe(outcome, seconds)
                return result
        self._observe(outcome, seconds)
        return self._keep(text, result)

    def _keep(self, text: str, result):
        self._cache[text] = result
        self._cache_bytes += _size(text, result)
        while self._cache_bytes > self.limits.cache_bytes and len(self._cache) > 1:
            self._cache_bytes -= _size(*self._cache.popitem(last=False))
        return result

    @staticmethod
    def _result(result):
        if isinstance(result, GrammarError):
            raise GrammarError(str(result))  # a fresh one: a raised exception keeps its traceback
        return result

    def _observe(self, outcome: str, seconds: float | None = None) -> None:
        if self._stats is not None:
            self._stats.observe_grammar(outcome, seconds)


def _size(text: str, result) -> int:
    return len(text) + (result.memory_size_bytes if isinstance(result, xgr.CompiledGrammar) else 0)
