"""What a hostile JSON schema costs: its own answer time, and an innocent stream's gaps beside it.

Starts the server in-process on the embedded model (built-in engine, or ``--backend vllm`` from the
vLLM environment), keeps one streaming completion running, and sends in turn: four plain chat
requests at once (the control: what any four requests joining the batch do to the stream), one JSON
schema whose enum lists 20,000 unique strings (a 400 KB body), four such at once (each its own
values, so no cache helps), and four at the limit (1,000 unique values each, compiled for real).
Prints one JSON document: per phase, the requests' statuses and seconds, and the stream's
inter-chunk gaps (p50, p99, max) in a quiet stretch before it and while it runs.

    python bench/structured_output_cost.py [--backend vllm] --out result.json
    python bench/structured_output_cost.py --render result.json   # the markdown table of a saved run
"""

from __future__ import annotations

import argparse
import dataclasses
import asyncio
import json
import random
import string
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from innocent_stream import InnocentStream  # noqa: E402
from serve import MODEL, machine  # noqa: E402

def plain_body() -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Pick one."}], "max_tokens": 8, "temperature": 0}


def enum_body(n: int, seed: int) -> dict:
    rnd = random.Random(seed)
    values = ["".join(rnd.choices(string.ascii_lowercase, k=16)) for _ in range(n)]
    return {**plain_body(), "response_format": {"type": "json_schema", "json_schema": {
        "name": "pick", "schema": {"type": "string", "enum": values}}}}


def gap_figures(gaps: list[float]) -> dict:
    if not gaps:
        return {"p50_s": None, "p99_s": None, "max_s": None, "n": 0}
    return {"p50_s": round(float(np.median(gaps)), 3), "p99_s": round(float(np.percentile(gaps, 99)), 3),
            "max_s": round(max(gaps), 3), "n": len(gaps)}


async def measure(base_url: str, seed: int, stream_tokens: int) -> list[dict]:
    phases = [("four plain requests at once (control)", [plain_body() for _ in range(4)]),
              ("one 20000-value enum", [enum_body(20000, seed)]),
              ("four 20000-value enums at once", [enum_body(20000, seed + k) for k in range(1, 5)]),
              ("four 1000-value enums at once", [enum_body(1000, seed + k) for k in range(5, 9)])]
    async with httpx.AsyncClient(base_url=base_url, timeout=900) as http, InnocentStream(http, stream_tokens) as stream:
        results = []
        for name, bodies in phases:
            quiet_from = time.monotonic()
            await asyncio.sleep(4)
            start = time.monotonic()

            async def send(body):
                sent = time.monotonic()
                r = await http.post("/v1/chat/completions", json=body)
                error = r.json().get("error", {}).get("message") if r.status_code != 200 else None
                return {"status": r.status_code, "seconds": round(time.monotonic() - sent, 2), "error": error}

            answers = await asyncio.gather(*(send(b) for b in bodies))
            end = time.monotonic()
            results.append({"phase": name, "requests": answers, "seconds": round(end - start, 2),
                            "stream_gaps_before": gap_figures(stream.gaps(quiet_from, start)),
                            "stream_gaps_during": gap_figures(stream.gaps(start, end))})
        return results


def render(report: dict) -> str:
    m = report["machine"]
    lines = [f"{report['backend']} backend; {m.get('cpu_model') or m['processor']}, {m['cpu_count']} cores, "
             f"torch {m['torch']}, transformers {m['transformers']}", "",
             "| phase | statuses | slowest answer s | stream gap p50 s before / during | "
             "stream gap p99 / max s before | during |", "| --- | --- | --- | --- | --- | --- |"]
    for phase in report["phases"]:
        statuses = ", ".join(str(r["status"]) for r in phase["requests"])
        before, during = phase["stream_gaps_before"], phase["stream_gaps_during"]
        lines.append(f"| {phase['phase']} | {statuses} | {max(r['seconds'] for r in phase['requests'])} | "
                     f"{before['p50_s']} / {during['p50_s'] or '–'} | {before['p99_s']} / {before['max_s']} | "
                     f"{during['p99_s'] or '–'} / {during['max_s'] or '–'} |")
    errors = sorted({r["error"] for phase in report["phases"] for r in phase["requests"] if r["error"]})
    return "\n".join(lines + [""] + [f"- {e}" for e in errors])


def cpu_model() -> str | None:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON here (vLLM logs to stdout too)")
    parser.add_argument("--render", metavar="FILE", help="print the table of a saved run and exit")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return

    from axiscap.axes import axis_for
    from axiscap.server.app import create_app, serve_in_background
    from axiscap.server.config import Settings
    from axiscap.server.state import load_state

    extra = {"dtype": "float32", "gpu_memory_utilization": 0.3, "max_model_len": 4096} if args.backend == "vllm" else {}
    settings = Settings(backend=args.backend, **extra)
    state = load_state(settings, axis_for(settings.model, settings.axis))
    with serve_in_background(create_app(state)) as base_url:
        window = min(state.model.context_length, settings.max_model_len or state.model.context_length)
        phases = asyncio.run(measure(base_url, int(time.time()), min(8000, window - 16)))
    report = json.dumps({"machine": {**machine(), "cpu_model": cpu_model()}, "backend": args.backend,
                         "limits": dataclasses.asdict(settings.schema_limits), "phases": phases}, indent=2)
    if args.out:
        Path(args.out).write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
