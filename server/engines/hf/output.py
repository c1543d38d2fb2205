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

import torch

from axiscap.steering import AxisHooks

from ..base import Delta, Logprob, Request, StatLogger, StepStats
from .request_state import Row
from .sampling import BatchSampler

log = logging.getLogger(__name__)


class OutputProcessor:
    def __init__(self, eos_ids: set[int], stat_logger: StatLogger):
        self.eos_ids = eos_ids
        self.stat_logger = stat_logger
        self.stats_loop: asyncio.AbstractEventLoop | None = None  # where statistics are recorded
        self.stats = StepStats()  # the current step's
        self._outbox: list[tuple[Request, Delta]] = []
        self.gate_switched = False  # a gated row's capping switched on since the runner last looked

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
        loop = self.stats_loop
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

    def publish(self, rows: list[Row], tokens: torch.Tensor, sampler: BatchSampler, hooks: AxisHooks | None,
                projections: torch.Tensor | None = None) -> list[Row]:
        """Move this step's tokens, projections (default: the monitor layer's at each row's last
        position), logprobs and cap counts to the host in one transfer; returns the rows that finished."""
        n = len(rows)
        here = tokens.device  # a model split across GPUs leaves these on different devices
        if hooks is not None:
            hits = hooks.cap_hits.to(here)
            projections = (projections if projections is not None else hooks.monitor_projection[:, -1]).to(here)
        else:
            projections, hits = torch.zeros(n, device=here), torch.zeros(0, device=here)
        parts = [tokens.double(), projections.double(), hits.double()]
        logprobs = sampler.logprobs
        if logprobs is not None:
            parts += [logprobs.chosen.double(), logprobs.top_ids.double().flatten(),
                      logprobs.top_values.double().flatten()]
        host = torch.cat(parts).tolist()
        if hooks is not None:
            hooks.cap_hits.zero_()
        if len(hits):
            self.stats.cap_hits.append(host[2 * n: 2 * n + len(hits)])
        k, at = (logprobs.top_ids.shape[1], 2 * n + len(hits)) if logprobs is not None else (0, 0)
        now = time.monotonic()
        finished: list[Row] = []
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
                self.fail([row.request])
                finished.append(row)
        return finished

    def _on_token(self, row: Row, token: int, projection: float, logprob: Logprob | None, now: float) -> bool:
        """Record one token for a row and emit what the client may see; True when it finished."""
        request, params = row.request, row.request.params
        row.generated_ids.append(token)
        if row.matcher is not None and not row.matcher.is_terminated() and not row.matcher.accept_token(token):
            raise ValueError(f"token {token} breaks the request's grammar")
        request.record_tokens(self.stats, [projection], now,
                              row.capped_from is not None and row.generated - 1 >= row.capped_from)
        if row.gate_open and params.gate.token_drifted(projection):
            row.capped_from = row.generated  # the next forward is capped: it makes the next token
            self.gate_switched = True
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
            first_pending = row.generated - len(row.pending_ids)
            switched_here = params.gate is not None and row.capped_from is not None and \
                first_pending <= row.capped_from < row.generated
            self.send(request, Delta(text, row.pending_ids, row.pending_projections, finish,
                                     row.pending_logprobs if params.logprobs is not None else None,
                                     None if row.first_delta_sent else row.prompt_logprobs,
                                     None if row.first_delta_sent else row.prompt_projections,
                                     row.capped_from if switched_here else None))
            row.pending_ids, row.pending_projections, row.pending_logprobs = [], [], []
            row.first_delta_sent = True
        return finish is not None
