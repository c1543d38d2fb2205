"""The transformers engine's waiting queue and admission: who joins the batch next.

Requests wait in arrival order. The next prefill group takes as many as the batch and the KV budget
admit; one that does not fit yet is passed by later ones that do (skip-ahead), until it has waited
``SKIP_AHEAD_S``: from then on nothing passes it, so running requests drain until it fits.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from ..base import QueueFull, Request
from .kv_slots import SlotStore
from .request_state import EngineRequest

# How long a request that does not fit the KV budget yet lets later, smaller ones go first.
SKIP_AHEAD_S = 10.0


class Scheduler:
    def __init__(self, max_batch_size: int, max_waiting: int, kv_cache_tokens: int | None):
        self.max_batch_size = max_batch_size
        self.batch_limit = max_batch_size  # lowered after an out-of-memory step (``limit_batch``)
        self.max_waiting = max_waiting
        self.kv_cache_tokens = kv_cache_tokens  # None: unbounded
        self.waiting: deque[EngineRequest] = deque()
        # Guards ``waiting`` and, with the runner, the move of a prefilled group into the batch, so that
        # ``add`` counts busy slots once, never twice or not at all; the engine thread waits on it for work.
        self.lock = threading.Condition()

    def add(self, requests: list[EngineRequest], busy_slots) -> None:
        """Queue requests, all or none, or raise QueueFull. ``busy_slots()`` is read under the lock."""
        with self.lock:
            room = self.max_waiting + max(0, self.max_batch_size - busy_slots()) - len(self.waiting)
            if len(requests) > room:
                raise QueueFull()
            self.waiting.extend(requests)
            self.lock.notify()

    def limit_batch(self, rows: int) -> None:
        """Run at most ``rows`` requests from now on (a step at a larger batch ran out of memory)."""
        self.batch_limit = max(1, rows)

    def has_waiting(self) -> bool:
        return bool(self.waiting)

    def waiting_count(self) -> int:
        with self.lock:
            return len(self.waiting)

    def take_all(self) -> list[EngineRequest]:
        """Empty the queue (the engine stops); returns what waited."""
        with self.lock:
            waiting = list(self.waiting)
            self.waiting.clear()
        return waiting

    def requeue(self, requests: list[EngineRequest], alone: bool = True) -> None:
        """Put requests back at the head of the queue, each to be prefilled in a group of its own
        (after a failure) unless told otherwise."""
        with self.lock:
            for request in reversed(requests):
                request.row.alone = request.row.alone or alone
                self.waiting.appendleft(request)

    def take(self, busy: int, running: bool, store: SlotStore) -> list[EngineRequest]:
        """The next prefill group (call it under ``lock``): waiting requests in arrival order, with
        skip-ahead. ``busy``: slots held by running rows; ``running``: whether any row runs."""
        taken: list[EngineRequest] = []
        now = time.monotonic()
        for request in list(self.waiting):
            if busy + len(taken) >= self.batch_limit:
                break
            if taken and (request.row.alone or taken[0].row.alone):
                break
            if request.row.prompt_logprobs_from in self.waiting:
                continue  # its first choice computes the prompt logprobs it shares: after that one
            if self.kv_cache_tokens is not None and (running or taken) and not self._fits(taken + [request], store):
                if now - request.arrival >= SKIP_AHEAD_S:
                    break  # its turn: later requests wait until running ones free its room
                continue
            taken.append(request)
        for request in taken:
            self.waiting.remove(request)
        return taken

    def _fits(self, group: list[EngineRequest], store: SlotStore) -> bool:
        """Whether the slots after ``group`` joins, and its prefill buffer meanwhile, fit the KV budget
        (compacting the store first when that makes the difference)."""
        def needed() -> int:
            prefill = len(group) * max(len(r.row.context_ids()) for r in group)
            return store.tokens_after_adding([r.row.capacity for r in group]) + prefill
        return needed() <= self.kv_cache_tokens or (store.compact() and needed() <= self.kv_cache_tokens)

    def drop_ended(self, now: float) -> list[tuple[Request, str]]:
        """Remove cancelled and timed-out requests from the queue; returns them with their reason."""
        with self.lock:
            ended = [(r, reason) for r in self.waiting if (reason := r.ended(now))]
            for request, _ in ended:
                self.waiting.remove(request)
        return ended
