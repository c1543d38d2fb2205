"""The generation engine: one thread that owns the model and runs an iteration-level batch.

Between two decode steps the engine ends cancelled and timed-out requests, admits waiting ones as
a group, prefills the next slice of that group's prompts (merging its KV cache into the running
batch once the prompts are in) and then decodes one token for every running request. Each request
keeps its own capping switch and sampling parameters.

Why our own scheduler rather than transformers' ``ContinuousBatchingManager``: that manager packs
all requests into one row (hooks see ``(1, total_tokens, hidden)``) and measured 4x slower than a
padded batch on this CPU; a padded batch gives the capping hooks a plain ``[batch, 1]`` row mask.

Layout: each running request keeps its KV in a slot of its own, in a size class chosen from its
reservation (prompt + max_tokens; see ``kv_slots``). A request joins by copying its own prefilled
KV into a slot and leaves by moving one other request into its hole: the cache is never re-copied
as a whole, and a short request never holds a long one's width. The batch is ordered by (class,
slot). A group of prompts is prefilled together (right-padded, in slices), each row's logits
kept at its own last prompt token, and joins the batch with its first tokens sampled.
Admission keeps the slots' memory, with the group's prefill buffer, within the KV budget.

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
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from axiscap.steering import AssistantAxis, AxisHooks

from ..base import (LOGPROB_FLOOR, Delta, DoesNotFit, Logprob, QueueFull, Request, SamplingParams, StatLogger,
                    StepStats, over_request_share)
from ..grammar import GrammarCompiler
from .kv_slots import PrefillStore, SlotStore, check_supported, slot_attention_for, slot_capacity
from .model_loading import LoadedModel
from .sampling import BatchSampler
from .structured_output import new_matcher
from .text_output import IncrementalDetokenizer, StopMatcher

if TYPE_CHECKING:
    import xgrammar as xgr

log = logging.getLogger(__name__)

_MAX_STRIKES = 3  # failed steps a request may be part of before it is failed itself
# How long a request that does not fit the KV budget yet lets later, smaller ones go first.
SKIP_AHEAD_S = 10.0
# Prompt positions per prefill step while a group computes prompt logprobs (echo): each position
# runs the vocabulary-wide output head (49k columns on SmolLM2), ~4x a plain prefill's cost per token.
PROMPT_LOGPROBS_SLICE_TOKENS = 128


@dataclass
class _Row:
    """Host-side state of one request, from submission to its end."""

    request: Request
    detok: IncrementalDetokenizer
    stops: StopMatcher
    generator: torch.Generator | None
    matcher: Any  # its grammar's matcher (response_format), or None
    capacity: int  # KV columns of its slot (see kv_slots)
    slot: int = -1
    length: int = 0  # tokens in its KV cache
    generated_ids: list[int] = field(default_factory=list)
    prefilled: bool = False  # its prompt tokens were counted
    strikes: int = 0  # failed steps it was part of
    alone: bool = False  # prefill it in a group of its own (its group failed once)
    pending_ids: list[int] = field(default_factory=list)
    pending_projections: list[float] = field(default_factory=list)
    pending_logprobs: list[Logprob] = field(default_factory=list)
    prompt_logprobs: list[Logprob | None] | None = None  # filled by the prefill when asked for
    prompt_logprobs_sent: bool = False  # they go out with its first delta
    prompt_logprobs_from: Request | None = None  # the choice whose prompt logprobs this one shares

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def generated(self) -> int:
        return len(self.generated_ids)

    def context_ids(self) -> list[int]:
        """What a (re-)prefill feeds the model: the prompt and every token generated so far."""
        return self.request.prompt_ids + self.generated_ids


class _PrefillGroup:
    """Requests admitted together, right-padded into one block and prefilled slice by slice."""

    def __init__(self, requests: list[Request], pad_id: int, device: torch.device):
        contexts = [r._row.context_ids() for r in requests]
        self.width = max(len(c) for c in contexts)
        self.requests = requests
        self.lengths = [len(c) for c in contexts]
        self.ids = torch.tensor([c + [pad_id] * (self.width - len(c)) for c in contexts], device=device)
        real = torch.tensor([[True] * len(c) + [False] * (self.width - len(c)) for c in contexts], device=device)
        capping = torch.tensor([[r.params.capping] for r in requests], device=device)
        self.cap_mask = capping & real if any(r.params.capping for r in requests) else None
        self.store = PrefillStore(self.width)
        # Each row's logits [rows, vocab] and monitor projection [rows] at its last prompt token.
        self.last_logits: torch.Tensor | None = None
        self.last_projections: torch.Tensor | None = None
        self.done = 0  # columns prefilled so far
        # Rows that asked for their prompt's logprobs and have not had them yet (not a re-prefill); a later
        # choice takes its first choice's, once that one has them (see Engine.submit_all).
        self.prompt_logprob_rows: list[int] = []
        for i, request in enumerate(requests):
            row = request._row
            if request.params.prompt_logprobs is None or row.generated != 0:
                continue
            if row.prompt_logprobs_from is not None and row.prompt_logprobs_from._row.prefilled:
                row.prompt_logprobs = row.prompt_logprobs_from._row.prompt_logprobs
            else:
                row.prompt_logprobs = [None]
                self.prompt_logprob_rows.append(i)


class Engine:
    def __init__(self, loaded: LoadedModel, axis: AssistantAxis | None, stat_logger: StatLogger,
                 max_batch_size: int = 16, max_waiting: int = 64, prefill_chunk_tokens: int = 512,
                 kv_cache_tokens: int | None = None, max_request_kv_share: float = 1.0):
        check_supported(loaded.model)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        # Without an axis (while one is being built) the engine generates with no hooks at all.
        self.hooks = AxisHooks(self.model, axis) if axis is not None else None
        self._no_hits = torch.zeros(0, device=self.device)
        # Statistics and deltas wait for the end of the step: the step's stats are recorded first, so a
        # client that sees its request end finds it counted.
        self.stat_logger = stat_logger
        self._stats_loop: asyncio.AbstractEventLoop | None = None  # where statistics are recorded
        self._stats = StepStats()
        self._outbox: list[tuple[Request, Delta]] = []
        self.max_batch_size = max_batch_size
        self._batch_limit = max_batch_size  # lowered after an out-of-memory step
        self.max_waiting = max_waiting
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.kv_cache_tokens = kv_cache_tokens  # None: unbounded
        # What one API request (all its choices) may reserve of it, so that one client cannot hold the rest.
        self.max_request_kv_tokens = int(kv_cache_tokens * max_request_kv_share) if kv_cache_tokens else None
        self.eos_ids = self._eos_ids()
        self.vocab_size = self.model.config.get_text_config().vocab_size  # the logits' width
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size)
        self.sampler = self._new_sampler()
        self.device_error: str | None = None  # set once the device itself has failed

        self._waiting: deque[Request] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

        self._rows: list[_Row] = []  # the running batch, in the store's (class, slot) order
        self._prefilling: _PrefillGroup | None = None
        self._store = SlotStore()
        self._next_input: torch.Tensor | None = None  # [batch] long, the tokens the next step feeds
        self._positions: torch.Tensor | None = None  # [batch] long, their positions (= row lengths)
        self._cap_rows: torch.Tensor | None = None  # [batch, 1] bool
        self._any_capping = False

    def _new_sampler(self) -> BatchSampler:
        return BatchSampler(self.device, self.vocab_size, self.eos_ids)

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = self.model.generation_config.eos_token_id
        ids.update(configured if isinstance(configured, list) else [configured])
        return {i for i in ids if i is not None}

    # --- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="axiscap-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.hooks is not None:
            self.hooks.remove()

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
        # xgrammar takes up to a second on a large schema: in a thread, not on the event loop.
        grammars = [await asyncio.to_thread(self.grammars.compile, *p.response_format) if p.response_format else None
                    for p in params]
        loop = self._stats_loop = asyncio.get_running_loop()
        requests = [self._new_request(prompt_ids, p, g, loop, timeout) for p, g in zip(params, grammars)]
        # Prompt logprobs (echo) run the vocabulary-wide output head at every prompt position: the first
        # choice computes them in a prefill group of its own, and the other choices, which share its
        # prompt, take its list and are prefilled after it at a plain prefill's cost.
        first, *others = requests
        if first.params.prompt_logprobs is not None:
            first._row.alone = True
            for request in others:
                request._row.prompt_logprobs_from = first
        share = self.max_request_kv_tokens
        if share is not None and (needed := sum(r.reserved_tokens for r in requests)) > share:
            raise over_request_share(len(requests), len(prompt_ids), params[0].max_tokens, needed, share,
                                     self.kv_cache_tokens)
        with self._wakeup:
            room = self.max_waiting + max(0, self.max_batch_size - self._busy_slots()) - len(self._waiting)
            if len(requests) > room:
                raise QueueFull()
            self._waiting.extend(requests)
            self._wakeup.notify()
        return requests

    def _new_request(self, prompt_ids: list[int], params: SamplingParams, grammar: xgr.CompiledGrammar | None,
                     loop: asyncio.AbstractEventLoop, timeout: float | None) -> Request:
        request = Request(prompt_ids, params, loop, timeout)
        reserved, budget = request.reserved_tokens, self.kv_cache_tokens
        if budget is not None and reserved > budget:
            raise DoesNotFit(f"the prompt ({len(prompt_ids)} tokens) and max_tokens ({params.max_tokens}) need "
                             f"{reserved} KV cache tokens; this server has {budget}")
        capacity = slot_capacity(reserved) if budget is None else min(slot_capacity(reserved), budget)
        request._row = _Row(request, IncrementalDetokenizer(self.tokenizer, prompt_ids), StopMatcher(params.stop),
                            BatchSampler.generator_for(params, self.device), new_matcher(grammar), capacity)
        return request

    def _busy_slots(self) -> int:
        # Call it under ``_wakeup``: the engine thread moves a prefilled group into the batch under
        # that lock, so the group's slots are counted once, never twice or not at all.
        group = self._prefilling
        return len(self._rows) + (len(group.requests) if group is not None else 0)

    # --- engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._stopping and not self._waiting and not self._rows and not self._prefilling:
                    self._wakeup.wait()
                if self._stopping:
                    break
            try:
                with torch.inference_mode():
                    self._drop_ended()
                    if self._prefilling is None:
                        with self._wakeup:  # taken and grouped under the lock: submit() sees them busy
                            admitted = self._take_waiting()
                            if admitted:
                                self._prefilling = _PrefillGroup(admitted, self.tokenizer.pad_token_id,
                                                                 self.device)
                    if self._prefilling is not None:
                        self._guarded(self._prefill_chunk, self._prefill_failed)
                        self._report()  # first tokens go out before the decode step
                    if self._rows:
                        self._guarded(self._decode_step, self._decode_failed)
            except Exception:  # the bookkeeping itself broke: nothing can be trusted, fail what runs
                log.exception("engine bookkeeping failed")
                self._fail([row.request for row in self._rows] +
                           (self._prefilling.requests if self._prefilling is not None else []))
                self._prefilling = None
                self._reset_batch()
            self._report()
        with self._wakeup:
            leftover = [row.request for row in self._rows] + list(self._waiting)
            leftover += self._prefilling.requests if self._prefilling is not None else []
            self._waiting.clear()
        for request in leftover:
            request.emit(Delta("", [], [], "cancelled"))

    def _send(self, request: Request, delta: Delta) -> None:
        if delta.finish_reason is not None:
            request.record_finish(self._stats, delta.finish_reason, time.monotonic())
        self._outbox.append((request, delta))

    def _report(self) -> None:
        """Record the step's statistics, then hand out its deltas.

        The statistics are recorded on the event loop the requests came from, not on this thread, which
        runs the model; they are queued there before the deltas, so a client that sees its request end
        finds it counted."""
        stats, self._stats = self._stats, StepStats()
        with self._wakeup:
            stats.waiting = len(self._waiting)
        stats.running = len(self._rows)
        loop = self._stats_loop
        try:
            if loop is None:  # no request came from a loop yet
                raise RuntimeError
            loop.call_soon_threadsafe(self._record, stats)
        except RuntimeError:  # or that loop is closed: here, then
            self._record(stats)
        outbox, self._outbox = self._outbox, []
        for request, delta in outbox:
            request.emit(delta)

    def _record(self, stats: StepStats) -> None:
        try:
            self.stat_logger.record(stats)
        except Exception:  # metrics are not worth a request: log it and go on
            log.exception("recording engine statistics failed")

    def _guarded(self, step, on_failure) -> None:
        try:
            step()
        except Exception as exc:
            if _is_device_failure(exc):  # the device can run nothing any more: /health says so
                self.device_error = f"{type(exc).__name__}: {exc}"
            on_failure(exc)

    def _fail(self, requests: list[Request]) -> None:
        for request in requests:
            self._send(request, Delta("", [], [], "error"))

    def _prefill_failed(self, exc: Exception) -> None:
        """Only the group is involved: the running batch has its own cache and goes on."""
        group, self._prefilling = self._prefilling, None
        if len(group.requests) == 1:
            log.error("prefill failed; failing its one request: %s: %s", type(exc).__name__, exc)
            self._fail(group.requests)
        else:
            log.warning("prefill of %d requests failed (%s: %s); retrying each alone", len(group.requests),
                        type(exc).__name__, exc)
            self._requeue(group.requests)

    def _decode_failed(self, exc: Exception) -> None:
        """A decode step runs every row at once, so the culprit is unknown and the cache may be half
        written: every row is re-prefilled from its own tokens, alone, and rejoins the batch."""
        if isinstance(exc, torch.OutOfMemoryError):
            self._batch_limit = max(1, len(self._rows) // 2)
            log.warning("out of memory at batch %d: running at most %d requests from now on",
                        len(self._rows), self._batch_limit)
        rows = self._rows
        self._reset_batch()
        for row in rows:
            row.strikes += 1
        failed = [row.request for row in rows if row.strikes >= _MAX_STRIKES]
        log.warning("decode step failed (%s: %s); re-prefilling %d requests, failing %d that kept failing",
                    type(exc).__name__, exc, len(rows) - len(failed), len(failed), exc_info=exc)
        self._fail(failed)
        self._requeue([row.request for row in rows if row.strikes < _MAX_STRIKES])

    def _requeue(self, requests: list[Request]) -> None:
        """Put requests back at the head of the queue, each to be prefilled in a group of its own."""
        with self._wakeup:
            for request in reversed(requests):
                request._row.alone = True
                self._waiting.appendleft(request)

    def _take_waiting(self) -> list[Request]:
        """The next prefill group: waiting requests in arrival order, as many as the batch and the KV
        budget admit. One that does not fit yet is passed by later ones that do (skip-ahead), until it
        has waited ``SKIP_AHEAD_S``: from then on nothing passes it, so running requests drain until
        it fits."""
        taken: list[Request] = []
        now = time.monotonic()
        for request in list(self._waiting):
            if self._busy_slots() + len(taken) >= self._batch_limit:
                break
            if taken and (request._row.alone or taken[0]._row.alone):
                break
            if request._row.prompt_logprobs_from in self._waiting:
                continue  # its first choice computes the prompt logprobs it shares: after that one
            if self.kv_cache_tokens is not None and (self._rows or taken) and not self._fits(taken + [request]):
                if now - request.arrival >= SKIP_AHEAD_S:
                    break  # its turn: later requests wait until running ones free its room
                continue
            taken.append(request)
        for request in taken:
            self._waiting.remove(request)
        return taken

    def _fits(self, group: list[Request]) -> bool:
        """Whether the slots after ``group`` joins, and its prefill buffer meanwhile, fit the KV budget
        (compacting the store first when that makes the difference)."""
        def needed() -> int:
            prefill = len(group) * max(len(r._row.context_ids()) for r in group)
            return self._store.tokens_after_adding([r._row.capacity for r in group]) + prefill
        return needed() <= self.kv_cache_tokens or (self._store.compact() and needed() <= self.kv_cache_tokens)

    def _drop_ended(self) -> None:
        """End cancelled and timed-out requests wherever they are, and free their rows
        (a group in prefill goes once all of it has ended)."""
        now = time.monotonic()

        def ended_among(requests) -> list[tuple[Request, str]]:
            return [(r, reason) for r in requests if (reason := r.ended(now))]

        with self._wakeup:
            ended = ended_among(self._waiting)
            for request, _ in ended:
                self._waiting.remove(request)
        group = self._prefilling
        if group is not None and len(in_group := ended_among(group.requests)) == len(group.requests):
            ended += in_group
            self._prefilling = None
        gone = [(row, reason) for row in self._rows if (reason := row.request.ended(now))]
        ended += [(row.request, reason) for row, reason in gone]
        if gone:
            self._remove_rows([row for row, _ in gone])
        for request, reason in ended:
            self._send(request, Delta("", [], [], reason))

    def _prefill_chunk(self) -> None:
        """Prefill the next slice of the waiting group's prompts; merge the group once it is done.

        Slicing bounds how long running streams wait for a long prompt: one decode step runs
        between two slices of at most ``prefill_chunk_tokens`` tokens. Cap hits of the slices are
        read back with the next decode step.
        """
        group = self._prefilling
        n, start = len(group.requests), group.done
        budget = self.prefill_chunk_tokens
        if group.prompt_logprob_rows:  # logits at every position: the vocabulary-wide head dominates the step
            budget = min(budget, PROMPT_LOGPROBS_SLICE_TOKENS)
        end = min(group.width, start + max(1, budget // n))
        # Logits only where a row's prompt ends inside this slice (each row at its own column).
        ending = [i for i, length in enumerate(group.lengths) if start < length <= end]
        if ending:  # per row, the slice column of its last token (clamped for rows not ending here)
            last = torch.tensor([[min(max(length - 1 - start, 0), end - start - 1)] for length in group.lengths],
                                device=self.device)
        self._set_cap_mask(group.cap_mask[:, start:end] if group.cap_mask is not None else None)
        group.store.begin(start, end, self.device)
        positions = torch.arange(start, end, device=self.device).expand(n, -1)
        every_column = bool(group.prompt_logprob_rows)  # logits at every prompt position (0: keep all)
        with slot_attention_for(self.model):
            out = self.model(input_ids=group.ids[:, start:end], position_ids=positions, past_key_values=group.store,
                             kv_store=group.store, use_cache=True,
                             logits_to_keep=0 if every_column else (last if ending else 1))
        logits = out.logits
        if every_column:
            self._prompt_logprobs(group, logits, start, end)
            if ending:
                logits = logits.gather(1, last.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        if ending:
            if group.last_logits is None:
                group.last_logits = logits.new_empty((n, logits.shape[-1]))
                group.last_projections = torch.zeros(n, device=self.device)
            index = torch.tensor(ending, device=self.device)
            group.last_logits[index] = logits[index, -1]
            if self.hooks is not None:
                projections = self.hooks.monitor_projection.gather(1, last.to(self.hooks.monitor_projection.device))
                group.last_projections[index] = projections[:, 0].to(self.device)[index]
        group.done = end
        if end < group.width:
            return
        rows = [r._row for r in group.requests]
        self._add_to_store(rows, group)
        for row in rows:
            if not row.prefilled:  # a re-prefill after a failed step is not new prompt work
                row.prefilled = True
                self._stats.prompt_tokens += len(row.request.prompt_ids)
        # Sample only the new rows, with their own parameters.
        sampler = self._new_sampler()
        sampler.set_rows(rows)
        tokens = sampler.sample(group.last_logits)
        # Published before the rows join, so the batch's sampler sees their first tokens on the host.
        try:
            finished = self._publish(rows, tokens, sampler, group.last_projections)
        except BaseException:  # the group is retried: its rows give their slots back, all of them
            for row in rows:
                self._store.remove(row)
            raise
        with self._wakeup:  # submit() counts busy slots under this lock: they move from group to batch at once
            self._prefilling = None
            self._reorder(rows, tokens)
        if finished:
            self._remove_rows(finished)

    def _prompt_logprobs(self, group: _PrefillGroup, logits: torch.Tensor, start: int, end: int) -> None:
        """Logprobs of the prompt tokens whose predicting position lies in this slice, for the rows
        that asked (one host transfer per slice: prefill work, not the decode loop)."""
        want = group.prompt_logprob_rows
        rows = [group.requests[i]._row for i in want]
        k = max(row.params.prompt_logprobs for row in rows)
        temperature = torch.tensor([row.params.temperature or 1.0 for row in rows], device=logits.device)
        # Column c predicts the token at c + 1: the last column of the whole block predicts nothing.
        stop = min(end, group.width - 1)
        if stop <= start:
            return
        index = torch.tensor(want, device=logits.device)
        logprobs = (logits[index, : stop - start].float() / temperature[:, None, None]).log_softmax(-1)
        targets = group.ids[index, start + 1 : stop + 1].to(logits.device)
        chosen = logprobs.gather(-1, targets.unsqueeze(-1))[..., 0]
        top = logprobs.topk(k, -1)
        host_targets, host_chosen, host_ids, host_values = (
            targets.tolist(), chosen.clamp(min=LOGPROB_FLOOR).tolist(), top.indices.tolist(),
            top.values.clamp(min=LOGPROB_FLOOR).tolist())
        for j, (i, row) in enumerate(zip(want, rows)):
            kept = row.params.prompt_logprobs
            for c in range(min(stop, group.lengths[i] - 1) - start):
                row.prompt_logprobs.append(Logprob(host_targets[j][c], host_chosen[j][c],
                                                   list(zip(host_ids[j][c][:kept], host_values[j][c][:kept]))))

    def _decode_step(self) -> None:
        self._store.begin_decode(self._positions)
        self._set_cap_mask(self._cap_rows if self._any_capping else None)
        with slot_attention_for(self.model):
            out = self.model(input_ids=self._next_input[:, None], position_ids=self._positions[:, None],
                             past_key_values=self._store, kv_store=self._store, use_cache=True, logits_to_keep=1)
        for row in self._rows:
            row.length += 1
        self._positions = self._positions + 1
        tokens = self.sampler.sample(out.logits[:, -1, :])
        self._next_input = tokens
        finished = self._publish(self._rows, tokens, self.sampler)
        if finished:
            self._remove_rows(finished)

    def _set_cap_mask(self, mask: torch.Tensor | None) -> None:
        if self.hooks is not None:
            self.hooks.set_cap_mask(mask)

    def _publish(self, rows: list[_Row], tokens: torch.Tensor, sampler: BatchSampler,
                 projections: torch.Tensor | None = None) -> list[_Row]:
        """Move this step's tokens, projections (default: the monitor layer's at each row's last
        position), logprobs and cap counts to the host in one transfer; returns the rows that finished."""
        n = len(rows)
        here = tokens.device  # a model split across GPUs leaves these on different devices
        if self.hooks is not None:
            hits = self.hooks.cap_hits.to(here)
            projections = (projections if projections is not None else self.hooks.monitor_projection[:, -1]).to(here)
        else:
            projections, hits = torch.zeros(n, device=here), self._no_hits
        parts = [tokens.double(), projections.double(), hits.double()]
        logprobs = sampler.logprobs
        if logprobs is not None:
            parts += [logprobs.chosen.double(), logprobs.top_ids.double().flatten(),
                      logprobs.top_values.double().flatten()]
        host = torch.cat(parts).tolist()
        if self.hooks is not None:
            self.hooks.cap_hits.zero_()
        if len(hits):
            self._stats.cap_hits.append(host[2 * n: 2 * n + len(hits)])
        k, at = (logprobs.top_ids.shape[1], 2 * n + len(hits)) if logprobs is not None else (0, 0)
        now = time.monotonic()
        finished: list[_Row] = []
        for i, row in enumerate(rows):
            token = int(host[i])
            logprob = None
            if logprobs is not None and row.params.logprobs is not None:
                top = range(at + n + i * k, at + n + i * k + row.params.logprobs)
                logprob = Logprob(token, host[at + i], [(int(host[j]), host[j + n * k]) for j in top])
            try:
                if self._on_token(row, token, host[n + i], logprob, now):
                    finished.append(row)
            except Exception:  # this row's text handling broke: it alone ends
                log.exception("could not emit a generated token; failing that request")
                self._fail([row.request])
                finished.append(row)
        return finished

    def _on_token(self, row: _Row, token: int, projection: float, logprob: Logprob | None, now: float) -> bool:
        """Record one token for a row and emit what the client may see; True when it finished."""
        request, params = row.request, row.request.params
        row.generated_ids.append(token)
        if row.matcher is not None and not row.matcher.is_terminated() and not row.matcher.accept_token(token):
            raise ValueError(f"token {token} breaks the request's grammar")
        request.record_tokens(self._stats, [projection], now)
        row.pending_ids.append(token)
        row.pending_projections.append(projection)
        if logprob is not None:
            row.pending_logprobs.append(logprob)

        finish = None
        if token in self.eos_ids and not params.ignore_eos:
            text, finish = row.stops.flush(), "stop"
        else:
            # Stop strings count only once min_tokens are out, as end-of-sequence does.
            text = row.stops.feed(row.detok.push(token), check=row.generated > params.min_tokens)
            if row.stops.stopped:
                finish = "stop"
            elif row.generated >= params.max_tokens:
                text, finish = text + row.stops.flush(), "length"
        if text or finish:
            self._send(request, Delta(text, row.pending_ids, row.pending_projections, finish,
                                      row.pending_logprobs if params.logprobs is not None else None,
                                      None if row.prompt_logprobs_sent else row.prompt_logprobs))
            row.pending_ids, row.pending_projections, row.pending_logprobs = [], [], []
            row.prompt_logprobs_sent = True
        return finish is not None

    # --- batch bookkeeping ------------------------------------------------------------------

    def _reorder(self, new_rows: list[_Row] = (), new_tokens: torch.Tensor | None = None) -> None:
        """Take the batch order from the store after rows joined (with the tokens they feed next)
        or left; the per-row device tensors follow it without leaving the device."""
        old = {id(row): i for i, row in enumerate(self._rows)}
        new = {id(row): len(old) + i for i, row in enumerate(new_rows)}
        self._rows = self._store.rows_in_order()
        if not self._rows:
            self._reset_batch()
            return
        feeding = [t for t in (self._next_input, new_tokens) if t is not None]
        feeding = torch.cat(feeding) if len(feeding) > 1 else feeding[0]
        where = [old[id(row)] if id(row) in old else new[id(row)] for row in self._rows]
        self._next_input = feeding[torch.tensor(where, device=self.device)]
        self._positions = torch.tensor([row.length for row in self._rows], device=self.device)
        self._cap_rows = torch.tensor([[row.request.params.capping] for row in self._rows], device=self.device)
        self._rows_changed()

    def _add_to_store(self, rows: list[_Row], group: _PrefillGroup) -> None:
        """Give the group's rows their slots, all or none (a failed copy leaves no half-joined rows)."""
        added = []
        try:
            for i, (row, length) in enumerate(zip(rows, group.lengths)):
                row.length = length
                self._store.add(row, group.store, i)
                added.append(row)
        except BaseException:
            for row in added:
                self._store.remove(row)
            raise

    def _remove_rows(self, gone: list[_Row]) -> None:
        for row in gone:
            self._store.remove(row)
        self._reorder()

    def _rows_changed(self) -> None:
        self._any_capping = any(row.request.params.capping for row in self._rows)
        self.sampler.set_rows(self._rows)

    def _reset_batch(self) -> None:
        self._rows, self._store = [], SlotStore()
        self._next_input = self._positions = self._cap_rows = None
        self._rows_changed()


def _is_device_failure(exc: Exception) -> bool:
    """A CUDA error (illegal access, ECC, lost device) leaves the context unusable for every request."""
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(exc, accelerator_error) or (isinstance(exc, RuntimeError) and "CUDA error" in str(exc))
