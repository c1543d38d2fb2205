"""``axiscap eval``: run the suites against an endpoint (by default a server it starts on the embedded
model) and write the report."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from axiscap.flags import add_flags, option
from axiscap.server.config import DEFAULT_MODEL_NAME

from .client import EvalClient
from .run import EvalConfig, run_all


@dataclass
class EvalOptions:
    """``axiscap eval``'s flags, generated from these fields."""

    url: str | None = option(None, help="base URL of the API, e.g. http://host:8000/v1 (default: start a local "
                                        "server)")
    model: str = option(DEFAULT_MODEL_NAME, help="model name on the endpoint (and the model a local server loads)")
    axis: Path | None = option(None, help="axis file for the local server (default: the shipped one)")
    api_key: str = option(os.environ.get("AXISCAP_EVAL_API_KEY", "unused"),
                          help="Bearer key for the endpoint (default: env AXISCAP_EVAL_API_KEY, else unused)")
    out: Path = option(Path("eval-report"), help="report folder")
    quick: bool = option(False, help="a few items per suite (CI, smoke runs)")
    max_tokens: int = option(EvalConfig.max_tokens, help="tokens per answer")
    concurrency: int = option(8, help="requests in flight")
    api: str = option("chat", help="ask through /v1/chat/completions (chat) or /v1/responses",
                      choices=["chat", "responses"])
    judge_url: str | None = option(None, help="judge jailbreak answers with an LLM at this OpenAI-compatible base "
                                              "URL (default: the offline classifier and role scorer)")
    judge_model: str = option("gpt-4o-mini", help="the judge's model name")
    device: str = option("auto", help="device of the local server: cpu, cuda or auto")


def add_parser(commands) -> None:
    ev = commands.add_parser(
        "eval", help="measure what capping changes: persona drift, persona jailbreaks, capability",
        description="Send every item of the three suites (evals/data) capped and uncapped to an OpenAI-compatible "
                    "endpoint that speaks axiscap's extensions, judge the jailbreak answers, and write report.md, "
                    "results.json and PNG plots. Without --url it starts a server on the embedded model.")
    add_flags(ev, EvalOptions)
    ev.set_defaults(run=_run)


@contextmanager
def local_server(model: str, axis_path: Path | None, device: str):
    """A real axiscap server on a free loopback port, in this process; yields its API's base URL."""
    from axiscap.axes import axis_for
    from axiscap.server.app import create_app, serve_in_background
    from axiscap.server.state import load_state
    from axiscap.server.config import Settings

    settings = Settings(model=model, device=device, max_waiting=1024, log_level="warning")
    with serve_in_background(create_app(load_state(settings, axis_for(model, axis_path)))) as base_url:
        yield base_url + "/v1"


def _server_info(url: str, api_key: str) -> dict:
    try:
        r = httpx.get(url.rstrip("/").removesuffix("/v1") + "/health", headers={"Authorization": f"Bearer {api_key}"})
        return r.json() if r.status_code in (200, 503) else {}
    except httpx.HTTPError:
        return {}


def _judge(args):
    from .judging import LLMJudge, OfflineJudge, validate_refusals

    if args.judge_url:
        return LLMJudge(args.judge_url, args.judge_model, args.api_key), f"LLM judge {args.judge_model}", None
    judge = OfflineJudge()
    return judge, "offline judge (refusal classifier + role scorer)", validate_refusals(judge)


def evaluate(url: str, args) -> Path:
    from .report import write_report

    judge, judge_name, validation = _judge(args)
    info = _server_info(url, args.api_key)
    cfg = EvalConfig(quick=args.quick, max_tokens=args.max_tokens)
    started = time.monotonic()

    async def go():
        client = EvalClient(url, args.model, args.api_key, args.concurrency, api=args.api)
        try:
            return await run_all(client, cfg, judge)
        finally:
            await client.aclose()

    results = asyncio.run(go())
    meta = {"model": args.model, "endpoint": url if args.url else "a local server on the embedded model",
            "judge": judge_name, "judge_validation": validation, "api": args.api, "quick": args.quick,
            "max_tokens": args.max_tokens,
            "wall_seconds": time.monotonic() - started, "monitor_tau": info.get("monitor_tau"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"}
    return write_report(args.out, results, meta)


def _run(args: argparse.Namespace) -> None:
    if args.url:
        path = evaluate(args.url, args)
    else:
        with local_server(args.model, args.axis, args.device) as url:
            path = evaluate(url, args)
    print(f"wrote {path}")
