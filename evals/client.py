"""A small async client for an OpenAI-compatible endpoint that speaks axiscap's extensions
(``capping``, ``return_projections``, sent through the SDK's ``extra_body``): chat answers with their
per-token projections, and the perplexity of a text from its prompt logprobs (completions with ``echo``).
The ``openai`` SDK does the HTTP: retries (429 after its Retry-After, 5xx, dropped connections) and timeouts."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import openai

RETRIES = 5  # a full server answers 429 with Retry-After; the SDK waits as it asks


@dataclass
class Answer:
    text: str
    projections: list[float]
    capping_applied: bool | str  # as the server says: true, false, or "auto" (gated)
    capping_from: int | None = None  # gated: the first token generated capped (None: none was)


class EvalClient:
    """``api``: "chat" asks through /v1/chat/completions, "responses" through /v1/responses (the same
    conversations, so the report shows both APIs cap alike)."""

    def __init__(self, base_url: str, model: str, api_key: str = "unused", concurrency: int = 8,
                 timeout: float = 600.0, api: str = "chat"):
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=RETRIES)
        self.model = model
        self.api = api
        self._slots = asyncio.Semaphore(concurrency)

    async def aclose(self) -> None:
        await self._client.close()

    async def _create(self, endpoint, **body) -> dict:
        """One call; the response as a dict, extension fields included. An error the retries did not
        cure ends the evaluation with the server's own message."""
        async with self._slots:
            try:
                return (await endpoint.create(model=self.model, **body)).to_dict()
            except openai.APIStatusError as exc:
                raise RuntimeError(f"{exc.request.url} answered {exc.status_code}: {exc.message}") from None
            except openai.APIConnectionError as exc:
                raise RuntimeError(f"{exc.request.url}: {exc.message}") from None

    async def chat(self, messages: list[dict], capping: bool | str, max_tokens: int, temperature: float = 0.0,
                   seed: int | None = None) -> Answer:
        if self.api == "responses":  # no seed there: the suites ask at temperature 0
            body = await self._create(self._client.responses, input=messages, max_output_tokens=max_tokens,
                                      temperature=temperature,
                                      extra_body={"capping": capping, "return_projections": True})
            text = "".join(part["text"] for item in body["output"] if item["type"] == "message"
                           for part in item["content"] if part["type"] == "output_text")
            projections = [p for p in body.get("axis_projections") or [] if p is not None]
            return Answer(text, projections, body.get("capping", capping), body.get("capping_from"))
        body = await self._create(self._client.chat.completions, messages=messages, max_tokens=max_tokens,
                                  temperature=temperature, seed=seed,
                                  extra_body={"capping": capping, "return_projections": True})
        choice = body["choices"][0]
        # null marks a token the server could not measure; the statistics skip it.
        projections = [p for p in choice.get("axis_projections") or [] if p is not None]
        return Answer(choice["message"].get("content") or "", projections, body.get("capping", capping),
                      choice.get("capping_from"))

    async def perplexity(self, text: str, capping: bool) -> float:
        """exp of the mean negative logprob of the text's tokens after the first, read from the
        prompt logprobs of a one-token completion with echo."""
        body = await self._create(self._client.completions, prompt=text, max_tokens=1, temperature=0, echo=True,
                                  logprobs=0, extra_body={"capping": capping})
        prompt_logprobs = body["choices"][0]["logprobs"]["token_logprobs"][:-1]  # the last is the completion's
        values = [v for v in prompt_logprobs if v is not None]
        return math.exp(-sum(values) / len(values))
