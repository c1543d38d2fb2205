"""A small async client for an OpenAI-compatible endpoint that speaks axiscap's extensions
(``capping``, ``return_projections``): chat answers with their per-token projections, and the
perplexity of a text from its prompt logprobs (completions with ``echo``)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import httpx


@dataclass
class Answer:
    text: str
    projections: list[float]
    capping_applied: bool


class EvalClient:
    def __init__(self, base_url: str, model: str, api_key: str = "unused", concurrency: int = 8,
                 timeout: float = 600.0):
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout,
                                       headers={"Authorization": f"Bearer {api_key}"})
        self.model = model
        self._slots = asyncio.Semaphore(concurrency)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, body: dict) -> dict:
        async with self._slots:
            for attempt in range(5):
                response = await self._http.post(path, json={"model": self.model, **body})
                if response.status_code != 429:  # the server is full: wait as it asks
                    break
                await asyncio.sleep(float(response.headers.get("retry-after", 1)) * (attempt + 1))
        if response.status_code != 200:
            raise RuntimeError(f"{path} answered {response.status_code}: {response.text[:300]}")
        return response.json()

    async def chat(self, messages: list[dict], capping: bool, max_tokens: int, temperature: float = 0.0,
                   seed: int | None = None) -> Answer:
        body = await self._post("/chat/completions", {
            "messages": messages, "max_tokens": max_tokens, "temperature": temperature, "seed": seed,
            "capping": capping, "return_projections": True})
        choice = body["choices"][0]
        # null marks a token the server could not measure; the statistics skip it.
        projections = [p for p in choice.get("axis_projections") or [] if p is not None]
        return Answer(choice["message"]["content"] or "", projections, bool(body.get("capping", capping)))

    async def perplexity(self, text: str, capping: bool) -> float:
        """exp of the mean negative logprob of the text's tokens after the first, read from the
        prompt logprobs of a one-token completion with echo."""
        body = await self._post("/completions", {"prompt": text, "max_tokens": 1, "temperature": 0, "echo": True,
                                                 "logprobs": 0, "capping": capping})
        prompt_logprobs = body["choices"][0]["logprobs"]["token_logprobs"][:-1]  # the last is the completion's
        values = [v for v in prompt_logprobs if v is not None]
        return math.exp(-sum(values) / len(values))
