"""How much one expensive request slows everyone else: a stream's gaps while ``echo`` + ``logprobs``
requests (prompt logprobs over the whole vocabulary at every prompt position) run beside it.

Starts the built-in engine in-process on the embedded model, keeps one streaming completion
running, and sends each expensive request in turn; prints one JSON document with, per request, its
own duration and the running stream's inter-chunk gaps (p50 and max) before and during it.

    python bench/expensive_requests.py
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from innocent_stream import InnocentStream  # noqa: E402
from serve import MODEL, machine  # noqa: E402

# (n, prompt words): within --max-prompt-logprobs-tokens (4096) by default; a word is ~3-4 tokens.
CASES = [(1, 600), (4, 250), (8, 130)]


async def measure(base_url: str) -> list[dict]:
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as http, InnocentStream(http) as stream:
        results = []
        for n, words in CASES:
            quiet_from = time.monotonic()
            await asyncio.sleep(3)
            start = time.monotonic()
            prompt = " ".join(f"w{i}" for i in range(words))
            r = await http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "echo": True,
                                                         "logprobs": 20, "n": n, "max_tokens": 1})
            end = time.monotonic()
            before, during = stream.gaps(quiet_from, start), stream.gaps(start, end)
            results.append({
                "n": n, "status": r.status_code, "prompt_tokens": r.json().get("usage", {}).get("prompt_tokens"),
                "seconds": round(end - start, 2),
                "stream_gap_p50_before_s": round(float(np.median(before)), 3) if before else None,
                "stream_gap_p50_during_s": round(float(np.median(during)), 3) if during else None,
                "stream_gap_max_during_s": round(max(during), 3) if during else None,
            })
        return results


def main() -> None:
    from axiscap.axes import axis_for
    from axiscap.server.app import create_app, serve_in_background
    from axiscap.server.state import load_state
    from axiscap.server.config import Settings

    settings = Settings()
    state = load_state(settings, axis_for(settings.model, settings.axis))
    with serve_in_background(create_app(state)) as base_url:
        results = asyncio.run(measure(base_url))
    print(json.dumps({"machine": machine(), "max_prompt_logprobs_tokens": settings.max_prompt_logprobs_tokens,
                      "requests": results}, indent=2))


if __name__ == "__main__":
    main()
