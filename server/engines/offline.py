"""Engines driven from synchronous code: the axis tools' batched generate functions.

``axes build``, ``check`` and ``calibrate`` hand whole lists of conversations to a generate
function; ``OfflineEngine`` submits them all at once, so the engine batches them as it batches a
server's requests. One event loop, in a thread of its own, serves the engine for its whole life:
vLLM's AsyncLLM binds its output handler to the loop it first runs on.

``calibrate`` generates with one axis after another (``GeneratorFor``): ``built_in_for`` starts the
built-in engine for each (no time), ``VllmForAxes`` starts vLLM once and retargets its caps.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import threading
from collections.abc import Coroutine, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from ..chat_template import chat_prompt_ids
from .base import DiscardStats, EngineClient, SamplingParams
from .vllm import engine_module

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

    async def _stop(self) -> None:  # and cancels it there
        self.engine.stop()

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
        self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)


def built_in(loaded, axis=None, max_batch_size: int = 16) -> OfflineEngine:
    """The built-in engine on a loaded model, started: without an axis (building one) or with one."""
    from .hf.engine import Engine

    engine = Engine(loaded, axis, DiscardStats(), max_batch_size=max_batch_size,
                    max_waiting=1 << 20)
    return OfflineEngine(engine, loaded.tokenizer, loaded.eos_ids)


@contextmanager
def built_in_for(loaded, axis) -> Iterator:
    """Generate with the built-in engine, every request capped by ``axis`` (None: uncapped)."""
    offline = built_in(loaded, axis)
    try:
        yield functools.partial(offline.generate, capping=axis is not None)
    finally:
        offline.close()


class VllmForAxes:
    """One vLLM engine for every axis a calibration generates with, started at the first (a rerun whose
    generating stages are done never starts it) and retargeted to each axis in turn, instead of a start
    (weights, compilation, graphs) per axis. A context manager whose value is the ``GeneratorFor``."""

    def __init__(self, model: str, cache_dir: Path | None, gpu_memory_utilization: float, loaded, axis_path: Path):
        self.model, self.cache_dir, self.gpu_memory_utilization = model, cache_dir, gpu_memory_utilization
        self.loaded, self.axis_path = loaded, axis_path  # the transformers model judging the same answers
        self.offline: OfflineEngine | None = None

    def _start(self) -> OfflineEngine:
        from axiscap.steering import load_axis

        from .model_source import model_source

        vllm = engine_module()
        source, name = model_source(self.model, self.cache_dir)
        axis = load_axis(self.axis_path)
        # In the transformers model's dtype, so that both read the same answers alike.
        options = vllm.VllmOptions(gpu_memory_utilization=self.gpu_memory_utilization,
                                   dtype=str(self.loaded.model.dtype).removeprefix("torch."))
        engine = vllm.VllmEngine(source, name, axis, DiscardStats(), options,
                                 max_waiting=1 << 20, retargetable=True)
        return OfflineEngine(engine, engine.model.tokenizer, self.loaded.eos_ids)

    @contextmanager
    def generate_with(self, axis) -> Iterator:
        if self.offline is None:
            self.offline = self._start()
        if axis is not None:
            self.offline.run(self.offline.engine.use_axis(axis))
        yield functools.partial(self.offline.generate, capping=axis is not None)

    def __enter__(self):
        return self.generate_with

    def __exit__(self, *exc) -> None:
        if self.offline is not None:
            self.offline.close()
