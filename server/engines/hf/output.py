"""The transformers engine's output side: a step's tokens become deltas, and statistics are recorded.

A step's sampled tokens, monitor projections, logprobs and cap counts come to the host in one
transfer; each row's token then goes through its grammar, detokenizer and stop strings, and what a
client may see waits in the outbox until ``report``: the step's statistics are recorded first, so a
client that sees its request end finds it counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import torch

from axiscap.steering.gate import Trip

from ..base import Delta, Logprob, Request, StatLogger, StepStats
from .request_state import Row
from .runner import StepOutput

log = logging.getLogger(__name__)


@dataclass
class ProcessedStep:
    """What a step's output changed: the rows that finished, and gated rows whose capping switched on."""

    finished: list[Row]
    switched: list[Row]


class OutputProcessor:
    def __init__(self, eos_ids: set[int], stat_logger: StatLogger):
        self.eos_ids = eos_ids
        self.stat_logger = stat_logger
        self._stats_loop: asyncio.AbstractEventLoop | None = None  # where statistics are recorded
        self.stats = StepStats()  # the current step's
        self._outbox: list[tuple[Request, Delta]] = []

    def send(self, request: Request, delta: Delta) -> None:
        if delta.finish_reason is not None:
            request.record_finish(self.stats, delta.finish_reason, time.monotonic())
        self._outbox.append((request, delta))

    def fail(self, requests: list[Request]) -> None:
        for request in requests:
            self.send(request, Delta("", [], [], "error"))

    def report(self, waiting: int, running: int) -> None:
        """Record the step's statistics, then hand out its deltas.

        The statistics are recorded on the event loop the requests came from, not on the engine's
        thread, which runs the model; they are queued there before the deltas."""
        stats, self.stats = self.stats, StepStats()
        stats.waiting, stats.running = waiting, running
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

    def record_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """Record statistics on ``loop`` from now on (the loop the requests come from)."""
        self._stats_loop = loop

    def count_prompt_tokens(self, tokens: int) -> None:
        self.stats.prompt_tokens += tokens

    def process(self, step: StepOutput) -> ProcessedStep:
        """Move the step's tokens, projections, logprobs and cap counts to the host in one transfer, and
        turn each row's token into what its client may see."""
        rows, tokens, logprobs = step.rows, step.tokens, step.logprobs
        n = len(rows)
        here = tokens.device  # a model split across GPUs leaves these on different devices
        projections = step.projections.to(here) if step.projections is not None else torch.zeros(n, device=here)
        hits = step.cap_hits.to(here) if step.cap_hits is not None else torch.zeros(0, device=here)
        parts = [tokens.double(), projections.double(), hits.double()]
        if logprobs is not None:
            parts += [logprobs.chosen.double(), logprobs.top_ids.double().flatten(),
                      logprobs.top_values.double().flatten()]
        host = torch.cat(parts).tolist()
        if len(hits):
            self.stats.cap_hits.append(host[2 * n: 2 * n + len(hits)])
        k, at = (logprobs.top_ids.shape[1], 2 * n + len(hits)) if logprobs is not None else (0, 0)
        now = time.monotonic()
        done = ProcessedStep([], [])
        for i, row in enumerate(rows):
            token = int(host[i])
            logprob = None
            if logprobs is not None and row.params.logprobs is not None:
                top = range(at + n + i * k, at + n + i * k + row.params.logprobs)
                logprob = Logprob(token, host[at + i], [(int(host[j]), host[j + n * k]) for j in top])
            try:
                capped_before = row.capping_on
                if self._on_token(row, token, host[n + i], logprob, now):
                    done.finished.append(row)
                elif row.capping_on and not capped_before:
                    done.switched.append(row)
            except Exception:  # this row's text handling broke: it alone ends
                log.exception("could not emit a generated token; failing that request")
                self.fail([row.request])
                done.finished.append(row)
        return done

    def _on_token(self, row: Row, token: int, projection: float, logprob: Logprob | None, now: float) -> bool:
        """Record one token for a row and emit what the client may see; True when it finished."""
        request, params = row.request, row.request.params
        row.generated_ids.append(token)
        if row.matcher is not None and not row.matcher.is_terminated() and not row.matcher.accept_token(token):
            raise ValueError(f"token {token} breaks the request's grammar")
        request.record_tokens(self.stats, [projection], now,
                              row.capping_from is not None and row.generated - 1 >= row.capping_from)
        tripped_here = row.gate_open and row.gate_watch.observe(projection)
        if tripped_here:
            row.trip = Trip("generation", row.generated, row.gate_watch.ewma, params.gate.action)
            if row.trip.action == "cap":
                row.capping_from = row.generated  # the next forward is capped: it makes the next token
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
            elif tripped_here and row.trip.action == "stop":
                text, finish = text + row.stops.flush(), "content_filter"
        # A trip goes out with the delta after it, so with the first token of a request tripped at its prompt.
        drift = self._trip_to_send(row)
        if text or finish or drift is not None:
            first_pending = row.generated - len(row.pending_ids)
            switched_here = params.gate is not None and row.capping_from is not None and \
                first_pending <= row.capping_from < row.generated
            self.send(request, Delta(text, row.pending_ids, row.pending_projections, finish,
                                     row.pending_logprobs if params.logprobs is not None else None,
                                     None if row.first_delta_sent else row.prompt_logprobs,
                                     None if row.first_delta_sent else row.prompt_projections,
                                     row.capping_from if switched_here else None, drift))
            row.pending_ids, row.pending_projections, row.pending_logprobs = [], [], []
            row.first_delta_sent = True
        return finish is not None

    def stop_at_prompt(self, row: Row) -> None:
        """End a gated request whose prompt tripped the gate under --drift-action stop, before any token."""
        self.send(row.request, Delta("", [], [], "content_filter", None, row.prompt_logprobs, row.prompt_projections,
                                     None, self._trip_to_send(row)))

    def _trip_to_send(self, row: Row) -> Trip | None:
        """The row's trip if it has not gone out yet (counted as it goes out, once)."""
        if row.trip is None or row.trip_sent:
            return None
        row.trip_sent = True
        row.request.record_trip(self.stats, row.trip)
        return row.trip
