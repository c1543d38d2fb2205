"""The front end's end of ``transport``: each request's monitor projections by position, and the
cap hits that go to the stat logger, as the vLLM workers report them after each step."""

from __future__ import annotations

import asyncio
import logging
import time

import zmq
import zmq.asyncio
from vllm.utils.network_utils import get_ip, get_open_port

from .transport import Forged, Receiver, StepReport, new_key

log = logging.getLogger(__name__)

# How long a token waits for its projection before it goes out without one (None: JSON null). Reports leave
# the worker before the token does, so this only matters if a worker stops reporting.
REPORT_WAIT_S = 5.0


class ProjectionReports:
    """The front end's end of ``transport``: projections by request and position, cap hits to the stat logger."""

    def __init__(self, record_cap_hits, cap_layers: list[int], other_nodes: bool):
        self._record_cap_hits, self._cap_layers = record_cap_hits, cap_layers
        self.key = new_key()
        self._receiver = Receiver(self.key)
        self.forged = 0  # messages dropped for a bad signature or a replayed sequence number
        self._socket = zmq.asyncio.Context.instance().socket(zmq.PULL)
        port = get_open_port()
        # Loopback unless workers may run on other nodes (Ray); either way only signed messages count.
        self._socket.bind(f"tcp://*:{port}" if other_nodes else f"tcp://127.0.0.1:{port}")
        self.address = f"tcp://{get_ip() if other_nodes else '127.0.0.1'}:{port}"
        self._projections: dict[str, dict[int, float]] = {}
        self._prompt: dict[str, dict[int, float]] = {}  # prompt projections, for requests that asked
        self._arrived: dict[str, asyncio.Event] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._receive())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._socket.close(linger=0)

    def open(self, rid: str, prompt: bool = False) -> None:
        self._projections[rid], self._arrived[rid] = {}, asyncio.Event()
        if prompt:
            self._prompt[rid] = {}

    def close(self, rid: str) -> None:
        self._projections.pop(rid, None)
        self._prompt.pop(rid, None)
        self._arrived.pop(rid, None)

    async def take(self, rid: str, positions: range) -> list[float | None]:
        """The monitor projections at these positions, waiting for reports still on their way;
        None for one that has not come in REPORT_WAIT_S (JSON null, and no histogram sample)."""
        values = await self._wait(rid, self._projections[rid], positions)
        seen = self._projections[rid]
        for stale in [p for p in seen if p < positions.stop]:  # rows of chunked prefills, never sampled
            del seen[stale]
        return values

    async def take_prompt(self, rid: str, cached: int, prompt_len: int) -> list[float | None]:
        """Every prompt token's projection: None for the first ``cached`` (a prefix-cache hit, never
        computed), the rest as the prefill's reports bring them."""
        values = await self._wait(rid, self._prompt.pop(rid), range(cached, prompt_len))
        return [None] * cached + values

    async def _wait(self, rid: str, seen: dict[int, float], positions: range) -> list[float | None]:
        arrived = self._arrived[rid]
        deadline = time.monotonic() + REPORT_WAIT_S
        while any(p not in seen for p in positions) and time.monotonic() < deadline:
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                log.warning("no projection reported for request %s at positions %s", rid, positions)
        return [seen.pop(p, None) for p in positions]

    async def _receive(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            try:
                self._take_in(self._receiver.decode(frames))
            except Forged as exc:  # another process on the port: never trusted, counted
                self.forged += 1
                log.warning("dropped a message on the projection reports socket that is not this server's "
                            "workers' (%s; %d so far)", exc, self.forged)
            except (ValueError, KeyError, TypeError, IndexError):
                log.warning("ignored a malformed message on the projection reports socket")

    def _take_in(self, report: StepReport) -> None:
        if report.hits:
            self._record_cap_hits([report.hits.get(layer, 0.0) for layer in self._cap_layers])
        if report.projections is None:
            return
        for rid, position, value in zip(report.ids, report.positions.tolist(), report.projections.tolist()):
            if rid in self._projections:
                self._projections[rid][position] = value
                self._arrived[rid].set()
        for rid, position, value in zip(report.prompt_ids, report.prompt_positions.tolist(),
                                        report.prompt_projections.tolist()):
            if rid in self._prompt:
                self._prompt[rid][position] = value
                self._arrived[rid].set()
