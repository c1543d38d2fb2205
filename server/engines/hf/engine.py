"""The transformers engine: one thread that owns the model and runs an iteration-level batch.

Between two decode steps the engine ends cancelled and timed-out requests, admits waiting ones as
a group (``scheduler``), prefills the next slice of that group's prompts (merging its KV cache into
the running batch once the prompts are in) and then decodes one token for every running request
(``runner``); each step's tokens become deltas and statistics in ``output``. Each request keeps its
own capping switch and sampling parameters.

Why our own scheduler rather than transformers' ``ContinuousBatchingManager``: that manager packs
all requests into one row (hooks see ``(1, total_tokens, hidden)``) and measured 4x slower than a
batch of rows on this CPU. Here a decode step has one row per request (``[batch, 1]``, each
request's KV in a slot of its own: ``kv_slots``), so the capping hooks take a plain per-row mask.

Isolation: what can fail for one request alone (its generator, detokenizer, stop strings) is set
up in ``submit``, before it joins a batch. If a step fails anyway, the engine narrows the failure
down instead of failing the batch: a prefill group is split and each request retried alone, and a
failed decode step re-prefills every running request from its prompt and the tokens it already
has. Only a request that fails alone, or keeps failing, gets an error.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING

import torch

from axiscap.steering import AssistantAxis, AxisHooks

from ..base import Delta, DoesNotFit, Request, SamplingParams, StatLogger, over_request_share
from ..grammar import GrammarCompiler, SchemaLimits
from .kv_slots import check_supported, slot_capacity
from .model_loading import LoadedModel
from .output import OutputProcessor
from .request_state import EngineRequest, Row
from .runner import ModelRunner
from .sampling import BatchSampler
from .scheduler import Scheduler
from .structured_output import new_matcher
from .threads import take_reserved_threads
from .text_output import IncrementalDetokenizer, StopMatcher

if TYPE_CHECKING:
    import xgrammar as xgr

log = logging.getLogger(__name__)

_MAX_STRIKES = 3  # failed steps a request may be part of before it is failed itself


class Engine:
    gated_capping = True  # SamplingParams.gate: the runner and the output processor switch rows on

    def __init__(self, loaded: LoadedModel, axis: AssistantAxis | None, stat_logger: StatLogger,
                 max_batch_size: int = 16, max_waiting: int = 64, prefill_chunk_tokens: int = 512,
                 kv_cache_tokens: int | None = None, max_request_kv_share: float = 1.0,
                 schema_limits: SchemaLimits = SchemaLimits()):
        check_supported(loaded.model)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.max_batch_size = max_batch_size
        self.kv_cache_tokens = kv_cache_tokens  # None: unbounded
        # What one API request (all its choices) may reserve of it, so that one client cannot hold the rest.
        self.max_request_kv_tokens = int(kv_cache_tokens * max_request_kv_share) if kv_cache_tokens else None
        self.eos_ids = loaded.eos_ids
        vocab_size = self.model.config.get_text_config().vocab_size  # the logits' width
        self.grammars = GrammarCompiler(self.tokenizer, vocab_size, schema_limits, stat_logger)
        self.device_error: str | None = None  # set once the device itself has failed

        # Without an axis (while one is being built) the engine generates with no hooks at all.
        self.hooks = AxisHooks(self.model, axis) if axis is not None else None
        self.scheduler = Scheduler(max_batch_size, max_waiting, kv_cache_tokens)
        self.runner = ModelRunner(self.model, self.device, self.hooks, self.tokenizer.pad_token_id, vocab_size,
                                  self.eos_ids, prefill_chunk_tokens)
        self.output = OutputProcessor(self.eos_ids, stat_logger)
        self.stat_logger = stat_logger
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="axiscap-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self.scheduler.lock:
            self._stopping = True
            self.scheduler.lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.hooks is not None:
            self.hooks.remove()
        self.grammars.stop()

    @property
    def max_waiting(self) -> int:
        return self.scheduler.max_waiting

    @max_waiting.setter
    def max_waiting(self, value: int) -> None:
        self.scheduler.max_waiting = value

    @property
    def healthy(self) -> bool:
        """The engine thread runs and the device has not failed."""
        alive = self._thread is not None and self._thread.is_alive() and not self._stopping
        return alive and self.device_error is None

    # --- called from the event loop ---------------------------------------------------------

    async def submit(self, prompt_ids: list[int], params: SamplingParams, timeout: float | None = None) -> Request:
        """Queue a request; raises ValueError for bad parameters, DoesNotFit, or QueueFull."""
        return (await self.submit_all(prompt_ids, [params], timeout))[0]

    async def submit_all(self, prompt_ids: list[int], params: list[SamplingParams],
                         timeout: float | None = None) -> list[Request]:
        """Queue requests on one prompt (the choices of an ``n > 1`` request), all or none."""
        # Off the event loop, in the compile pool (the choices share one compile).
        grammars = [await self.grammars.compile(*p.response_format) if p.response_format else None
                    for p in params]
        loop = asyncio.get_running_loop()
        self.output.record_on(loop)
        requests = [self._new_request(prompt_ids, p, g, loop, timeout) for p, g in zip(params, grammars)]
        # Prompt logprobs (echo) run the vocabulary-wide output head at every prompt position: the first
        # choice computes them in a prefill group of its own, and the other choices, which share its
        # prompt, take its list and are prefilled after it at a plain prefill's cost.
        first, *others = requests
        if first.params.prompt_logprobs is not None:
            first.row.alone = True
            for request in others:
                request.row.prompt_logprobs_from = first
        share = self.max_request_kv_tokens
        if share is not None and (needed := sum(r.reserved_tokens for r in requests)) > share:
            raise over_request_share(len(requests), len(prompt_ids), params[0].max_tokens, needed, share,
                                     self.kv_cache_tokens)
        self.scheduler.add(requests, self.runner.busy_slots)
        return requests

    def _new_request(self, prompt_ids: list[int], params: SamplingParams, grammar: xgr.CompiledGrammar | None,
                     loop: asyncio.AbstractEventLoop, timeout: float | None) -> EngineRequest:
        request = EngineRequest(prompt_ids, params, loop, timeout)
        reserved, budget = request.reserved_tokens, self.kv_cache_tokens
        if budget is not None and reserved > budget:
            raise DoesNotFit(f"the prompt ({len(prompt_ids)} tokens) and max_tokens ({params.max_tokens}) need "
                             f"{reserved} KV cache tokens; this server has {budget}")
        capacity = slot_capacity(reserved) if budget is None else min(slot_capacity(reserved), budget)
        request.row = Row(request, IncrementalDetokenizer(self.tokenizer, prompt_ids), StopMatcher(params.stop),
                          BatchSampler.generator_for(params, self.device), new_matcher(grammar), capacity,
                          capping_from=0 if params.capping else None,
                          gate_watch=params.gate.watch() if params.gate is not None else None)
        return request

    # --- engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        take_reserved_threads()
        runner, lock = self.runner, self.scheduler.lock
        while True:
            with lock:
                while not self._stopping and not self.scheduler.has_waiting() and not runner.rows and \
                        runner.prefilling is None:
                    lock.wait()
                if self._stopping:
                    break
            try:
                with torch.inference_mode():
                    self._drop_ended()
                    if runner.prefilling is None:
                        with lock:  # taken and grouped under the lock: submit() sees them busy
                            admitted = self.scheduler.take(len(runner.rows), bool(runner.rows), runner.store)
                            if admitted:
                                runner.begin_group(admitted)
                    if runner.prefilling is not None:
                        self._guarded(self._prefill_slice, self._prefill_failed)
                        self._report()  # first tokens go out before the decode step
                    if runner.rows:
                        self._guarded(self._decode_step, self._decode_failed)
            except Exception:  # the bookkeeping itself broke: nothing can be trusted, fail what runs
                log.exception("engine bookkeeping failed")
                group = runner.drop_group()
                self.output.fail([row.request for row in runner.rows] + (group.requests if group is not None else []))
                runner.reset()
            self._report()
        group = runner.drop_group()
        leftover = [row.request for row in runner.rows] + self.scheduler.take_all()
        leftover += group.requests if group is not None else []
        for request in leftover:
            request.emit(Delta("", [], [], "cancelled"))

    def _report(self) -> None:
        self.output.report(self.scheduler.waiting_count(), len(self.runner.rows))

    def _prefill_slice(self) -> None:
        done = self.runner.prefill_slice()
        if done is None:
            return
        self.output.count_prompt_tokens(done.prompt_tokens)
        # Processed before the rows join, so the batch's sampler sees their first tokens on the host.
        finished = []
        if done.step is not None:
            try:
                finished = self.output.process(done.step).finished
            except BaseException:  # the group is retried: its rows give their slots back, all of them
                self.runner.release(done.step.rows)
                raise
        for request in done.stopped:
            self.output.stop_at_prompt(request.row)
        with self.scheduler.lock:  # submit() counts busy slots under this lock: they move from group to batch at once
            self.runner.join(done)
            # Gated requests whose prompts drifted: prefilled again, capped, before anything else.
            self.scheduler.requeue(done.recap, alone=False)
        if finished:
            self.runner.remove(finished)

    def _decode_step(self) -> None:
        done = self.output.process(self.runner.decode_step())
        if done.finished:
            self.runner.remove(done.finished)  # the batch's switches are taken again from its rows
        elif done.switched:
            self.runner.capping_changed()

    def _drop_ended(self) -> None:
        """End cancelled and timed-out requests wherever they are, and free their rows
        (a group in prefill goes once all of it has ended)."""
        now = time.monotonic()
        runner = self.runner
        ended = self.scheduler.drop_ended(now)
        group = runner.prefilling
        if group is not None:
            in_group = [(r, reason) for r in group.requests if (reason := r.ended(now))]
            if len(in_group) == len(group.requests):
                ended += in_group
                runner.drop_group()
        gone = [(row, reason) for row in runner.rows if (reason := row.request.ended(now))]
        ended += [(row.request, reason) for row, reason in gone]
        if gone:
            runner.remove([row for row, _ in gone])
        for request, reason in ended:
            self.output.send(request, Delta("", [], [], reason))

    # --- failures ---------------------------------------------------------------------------

    def _guarded(self, step, on_failure) -> None:
        try:
            step()
        except Exception as exc:
            if _is_device_failure(exc):  # the device can run nothing any more: /health says so
                self.device_error = f"{type(exc).__name__}: {exc}"
            on_failure(exc)

    def _prefill_failed(self, exc: Exception) -> None:
        """Only the group is involved: the running batch has its own cache and goes on."""
        group = self.runner.drop_group()
        if len(group.requests) == 1:
            log.error("prefill failed; failing its one request: %s: %s", type(exc).__name__, exc)
            self.output.fail(group.requests)
        else:
            log.warning("prefill of %d requests failed (%s: %s); retrying each alone", len(group.requests),
                        type(exc).__name__, exc)
            self.scheduler.requeue(group.requests)

    def _decode_failed(self, exc: Exception) -> None:
        """A decode step runs every row at once, so the culprit is unknown and the cache may be half
        written: every row is re-prefilled from its own tokens, alone, and rejoins the batch."""
        rows = self.runner.rows
        if isinstance(exc, torch.OutOfMemoryError):
            self.scheduler.limit_batch(len(rows) // 2)
            log.warning("out of memory at batch %d: running at most %d requests from now on",
                        len(rows), self.scheduler.batch_limit)
        self.runner.reset()
        for row in rows:
            row.strikes += 1
        failed = [row.request for row in rows if row.strikes >= _MAX_STRIKES]
        log.warning("decode step failed (%s: %s); re-prefilling %d requests, failing %d that kept failing",
                    type(exc).__name__, exc, len(rows) - len(failed), len(failed), exc_info=exc)
        self.output.fail(failed)
        self.scheduler.requeue([row.request for row in rows if row.strikes < _MAX_STRIKES])


def _is_device_failure(exc: Exception) -> bool:
    """A CUDA error (illegal access, ECC, lost device) leaves the context unusable for every request."""
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(exc, accelerator_error) or (isinstance(exc, RuntimeError) and "CUDA error" in str(exc))
