"""A streaming completion that runs beside what a benchmark measures, and its inter-chunk gaps:
how much one kind of request slows everyone else (``expensive_requests.py``,
``structured_output_cost.py``)."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np

from serve import MODEL


class InnocentStream:
    """``async with InnocentStream(http):`` runs a completion until the block ends; ``gaps(since,
    until)`` are the seconds between its chunks in that span."""

    def __init__(self, http: httpx.AsyncClient, max_tokens: int = 8000):
        # Longer than any of these runs at this model's speeds, and within its 8192-token window.
        self._http, self._max_tokens = http, max_tokens
        self._times: list[float] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> InnocentStream:
        self._task = asyncio.create_task(self._run())
        while len(self._times) < 10:  # streaming before anything is measured
            if self._task.done():
                self._task.result()  # its error
            await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *exc) -> None:
        self._stop.set()
        await self._task

    async def _run(self) -> None:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": self._max_tokens, "ignore_eos": True,
                "stream": True}
        async with self._http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"the innocent stream was refused: {(await r.aread()).decode()}")
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    self._times.append(time.monotonic())
                if self._stop.is_set():
                    return

    def gaps(self, since: float, until: float) -> list[float]:
        times = [t for t in self._times if since <= t <= until]
        return [float(g) for g in np.diff(times)] if len(times) > 1 else []
