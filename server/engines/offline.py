"""An engine driven from synchronous code: the axis tools' batched generate function.

``axes build``, ``check`` and ``calibrate`` hand whole lists of conversations to a generate
function; ``OfflineEngine`` submits them all at once, so the engine batches them as it batches a
server's requests. One event loop, in a thread of its own, serves the engine for its whole life:
vLLM's AsyncLLM binds its output handler to the loop it first runs on.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Coroutine, Iterable

from transformers import PreTrainedTokenizerBase

from ..chat_template import chat_prompt_ids
from .base import EngineClient, SamplingParams

Conversation = list[dict[str, str]]


class OfflineEngine:
    def __init__(self, engine: EngineClient, tokenizer: PreTrainedTokenizerBase, eos_ids: Iterable[int]):
        self.engine, self.tokenizer, self.eos_ids = engine, tokenizer, set(eos_ids)
        self._seeds = itertools.count()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="axiscap-offline", daemon=True)
        self._thread.start()
        self.run(self._start())

    async def _start(self) -> None:  # on the loop: the vLLM engine starts its reports task there
        self.engine.start()

    def run(self, coroutine: Coroutine):
        """Run a coroutine on the engine's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def generate(self, conversations: list[Conversation], temperature: float, top_p: float, max_tokens: int,
                 capping: bool = False) -> list[tuple[list[int], list[int]]]:
        """Each conversation's (prompt ids, answer ids without the end-of-sequence token), all submitted
        at once; capped by the engine's axis where ``capping``. Seeded, so a rerun samples the same."""
        async def one(messages: Conversation):
            ids = chat_prompt_ids(self.tokenizer, messages)
            params = SamplingParams(max_tokens, temperature, top_p, seed=next(self._seeds), capping=capping)
            (request,) = await self.engine.submit_all(ids, [params])
            answer = []
            async for delta in request.deltas():
                if delta.finish_reason not in (None, "stop", "length"):
                    raise RuntimeError(f"the engine ended an answer with {delta.finish_reason!r}")
                answer += delta.token_ids
            return ids, [t for t in answer if t not in self.eos_ids]

        async def all_of_them():
            return await asyncio.gather(*[one(m) for m in conversations])

        return self.run(all_of_them())

    def close(self) -> None:
        self.engine.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
