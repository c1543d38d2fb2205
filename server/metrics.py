"""Prometheus metrics: persona drift along the axis, and the usual serving figures.

Every series carries the served model's name; per-request values never become labels.
"""

from __future__ import annotations

import typing

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from axiscap.steering.gate import DriftAction, DriftSource

from .engines.base import FINISH_REASONS, StepStats

PREFIX = "axiscap"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                    10.0, 20.0, 40.0, 80.0)
_COMPILE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
GRAMMAR_OUTCOMES = ("ok", "error", "timeout")
_GENERIC_PROJECTION_BUCKETS = (-50, -20, -10, -5, -2, -1, 0, 1, 2, 5, 10, 20, 50)
# Conversation depth of a request's previous assistant turn (the k-th of its conversation), bucketed.
DEPTHS = ("1", "2-3", "4-7", "8+")


def depth_bucket(turn: int) -> str:
    return "1" if turn <= 1 else "2-3" if turn <= 3 else "4-7" if turn <= 7 else "8+"


def tau_edge(threshold: float) -> float:
    """tau as the histogram's bucket edge (rounded like every edge), so the below-tau counter and the
    le=tau bucket compare against the same value."""
    return round(threshold, 4)


def projection_buckets(mean: float | None, std: float | None, threshold: float | None) -> list[float]:
    """Buckets around the default-Assistant projection distribution, with tau as an exact edge
    so that the share of tokens below the threshold can be read off the histogram."""
    if mean is None or not std or std <= 0:
        edges = set(float(b) for b in _GENERIC_PROJECTION_BUCKETS)
    else:
        steps = (-6, -4, -3, -2.5, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6)
        edges = {round(mean + s * std, 4) for s in steps}
    if threshold is not None:
        edges.add(tau_edge(threshold))
    return sorted(edges)


class ServingMetrics:
    def __init__(self, model: str, cap_layers: list[int], buckets: list[float],
                 monitor_threshold: float | None = None, queue_capacity: int | None = None,
                 registry: CollectorRegistry | None = None, persona_series: bool = True):
        """``persona_series`` off leaves out the per-token persona series (projection histogram, tokens
        below tau, cap activations): a client who may not have its projections could read them back
        from an open /metrics around its own request (``Settings.persona_metrics``)."""
        self.registry = registry or CollectorRegistry()
        r, m = self.registry, model
        # Unregistered when off: they exist so that the recording code needs no second path.
        pr = r if persona_series else None
        self.axis_projection = Histogram(
            f"{PREFIX}_axis_projection", "Per generated token: projection of the monitor layer's residual "
            "stream onto the unit Assistant Axis, before that layer's cap. Lower means further from the Assistant.",
            ["model", "capping"], buckets=buckets, registry=pr)
        self._projection = {on: self.axis_projection.labels(m, "on" if on else "off") for on in (True, False)}
        self._below_edge = tau_edge(monitor_threshold) if monitor_threshold is not None else None
        self.below_threshold = Counter(
            f"{PREFIX}_tokens_below_threshold", "Generated tokens whose monitor-layer projection (before the cap) "
            "was at or below that layer's cap threshold tau: the same count as the projection histogram's "
            "le=tau bucket.", ["model", "capping"], registry=pr)
        self._below = {on: self.below_threshold.labels(m, "on" if on else "off") for on in (True, False)}
        threshold = Gauge(f"{PREFIX}_monitor_threshold", "Cap threshold tau of the monitor layer, in projection "
                          "units: the floor capping enforces there.", ["model"], registry=r)
        if monitor_threshold is not None:
            threshold.labels(m).set(monitor_threshold)
        self.cap_activations = Counter(
            f"{PREFIX}_cap_activations", "Token positions whose activation the cap changed, by decoder layer.",
            ["model", "layer"], registry=pr)
        self._cap = [self.cap_activations.labels(m, str(l)) for l in cap_layers]
        # Drift over turns, for live traffic: each chat request observes its prompt's last assistant turn once.
        self.previous_turn = Histogram(
            f"{PREFIX}_previous_turn_projection", "Per chat request whose prompt holds an assistant turn: the mean "
            "monitor-layer projection of the last such turn's tokens, by that turn's depth in the conversation "
            "(1, 2-3, 4-7, 8+). Falling with depth is the paper's persona drift.", ["model", "depth"],
            buckets=buckets, registry=pr)
        self.previous_turn_below = Counter(
            f"{PREFIX}_previous_turns_below_threshold", "Previous assistant turns (as in previous_turn_projection) "
            "whose mean projection was at or below tau, by depth.", ["model", "depth"], registry=pr)
        for depth in DEPTHS:  # every depth exported from the start, so rates and alerts work before traffic
            self.previous_turn.labels(m, depth)
            self.previous_turn_below.labels(m, depth)
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "Per engine request (one per choice) that generated a "
            "token: from its arrival to its first generated token.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r).labels(m)
        self.inter_token_latency = Histogram(
            f"{PREFIX}_inter_token_latency_seconds", "Between consecutive outputs of tokens of one engine "
            "request (one token each on the built-in engine; vLLM may send several at once).",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r).labels(m)
        self.request_duration = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds", "Per engine request that finished generating (stop or "
            "length): from its arrival to its last token.", ["model"], buckets=_LATENCY_BUCKETS, registry=r).labels(m)
        self.grammar_compile = Histogram(
            f"{PREFIX}_grammar_compile_seconds", "Per JSON schema compiled for structured output (response_format, "
            "forced tool calls), in a compile worker: ok, error (xgrammar refused it: 400) or timeout (stopped at "
            "--grammar-compile-timeout: 400). Schemas over a --max-schema-* limit are refused before any compile.",
            ["model", "outcome"], buckets=_COMPILE_BUCKETS, registry=r)
        self.grammar_cache_hits = Counter(
            f"{PREFIX}_grammar_cache_hits", "JSON schemas answered from the compile cache (a compiled grammar or "
            "a refusal), with no compile.", ["model"], registry=r).labels(m)
        for outcome in GRAMMAR_OUTCOMES:
            self.grammar_compile.labels(m, outcome)
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens prefilled, once per engine request.", ["model"],
            registry=r).labels(m)
        self.generation_tokens = Counter(
            f"{PREFIX}_generation_tokens", "Tokens generated, by whether the request was capped.",
            ["model", "capping"], registry=r)
        self._generated = {on: self.generation_tokens.labels(m, "on" if on else "off") for on in (True, False)}
        self.requests = Counter(
            f"{PREFIX}_requests", "Engine requests (one per choice) that ended, by finish reason: stop, length "
            "(finished generating), cancelled (the client left), timeout (--request-timeout), error (failed on "
            "the server). A request counted here is never counted in rejected_requests.",
            ["model", "finish_reason"], registry=r)
        self.drift_detections = Counter(
            f"{PREFIX}_drift_detections", "Gated requests whose gate tripped, by where it saw drift (prompt: a "
            "system or assistant message; generation: the token detector) and what --drift-action did (cap, flag, "
            "stop).", ["model", "source", "action"], registry=r)
        self.rejected = Counter(
            f"{PREFIX}_rejected_requests", "HTTP requests answered with an error before any engine took them, by "
            "status.", ["model", "status"], registry=r)
        # Known label values start at zero, so rates and alerts work before the first occurrence.
        for reason in FINISH_REASONS:
            self.requests.labels(m, reason)
        for source in typing.get_args(DriftSource):
            for action in typing.get_args(DriftAction):
                self.drift_detections.labels(m, source, action)
        for status in ("400", "401", "403", "404", "408", "413", "429", "500"):
            self.rejected.labels(m, status)
        self.running = Gauge(f"{PREFIX}_requests_running", "Requests in the running batch.",
                             ["model"], registry=r).labels(m)
        self.waiting = Gauge(f"{PREFIX}_requests_waiting", "Requests queued for the batch.",
                             ["model"], registry=r).labels(m)
        capacity = Gauge(f"{PREFIX}_queue_capacity", "Engine requests that may wait beyond the running "
                         "batch (--max-waiting, on both engines); past it new requests get 429.",
                         ["model"], registry=r)
        if queue_capacity is not None:
            capacity.labels(m).set(queue_capacity)
        self.model = m

    def record(self, stats: StepStats) -> None:
        """An engine's report of what it did (the StatLogger every engine feeds)."""
        self.waiting.set(stats.waiting)
        self.running.set(stats.running)
        if stats.prompt_tokens:
            self.prompt_tokens.inc(stats.prompt_tokens)
        for seconds in stats.first_token_seconds:
            self.time_to_first_token.observe(seconds)
        for seconds in stats.inter_token_seconds:
            self.inter_token_latency.observe(seconds)
        for projection, capping in stats.tokens:
            self.observe_token(projection, capping)
        for hits in stats.cap_hits:
            self.add_cap_hits(hits)
        for reason, seconds in stats.finished:
            self.finished(reason)
            if seconds is not None:
                self.request_duration.observe(seconds)
        for source, action in stats.drift_detections:
            self.drift_detections.labels(self.model, source, action).inc()

    def observe_token(self, projection: float | None, capping: bool) -> None:
        self._generated[capping].inc()
        if projection is None:  # the engine lost it (a worker stopped reporting): counted, not measured
            return
        self._projection[capping].observe(projection)
        if self._below_edge is not None and projection <= self._below_edge:
            self._below[capping].inc()

    def observe_previous_turn(self, turn: int, mean: float) -> None:
        depth = depth_bucket(turn)
        self.previous_turn.labels(self.model, depth).observe(mean)
        if self._below_edge is not None and mean <= self._below_edge:
            self.previous_turn_below.labels(self.model, depth).inc()

    def add_cap_hits(self, hits: list[float]) -> None:
        for counter, n in zip(self._cap, hits):
            if n:
                counter.inc(n)

    def observe_grammar(self, outcome: str, seconds: float | None = None) -> None:
        if outcome == "cached":
            self.grammar_cache_hits.inc()
        else:
            self.grammar_compile.labels(self.model, outcome).observe(seconds)

    def finished(self, reason: str) -> None:
        self.requests.labels(self.model, reason).inc()

    def reject(self, status: int) -> None:
        self.rejected.labels(self.model, str(status)).inc()
