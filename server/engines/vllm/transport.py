"""How per-token projections and cap counts travel from vLLM's workers to axiscap's front end.

A side channel over ZeroMQ (PUSH in the worker, PULL in the front end), not vLLM's own output
path. vLLM's outputs pass worker -> engine core (scheduler) -> front end through fixed message
types that have no field for them; carrying them there would mean patching the scheduler and the
output processor. vLLM already depends on pyzmq and talks between its processes the same way.
One message per forward step carries every request of the batch, so the cost does not grow with
the number of capped layers, and the worker sends it from a thread after an asynchronous copy to
the host, so the step itself never waits on the device.

A message is two frames: a JSON header and the float64 payload
``[positions (n), projections (n), cap hits (k)]``, where row i belongs to ``ids[i]`` and
``positions[i]`` is the position of the token whose hidden state produced that request's next
token. The front end keys projections by that position, so chunked prefills (whose rows are
not sampled) and recomputation after preemption need no bookkeeping on the worker.
"""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch
import zmq


@dataclass
class StepReport:
    ids: list[str]  # axiscap request ids, one per row
    positions: np.ndarray  # int64 [n]
    projections: np.ndarray | None  # float64 [n]; None from a pipeline stage without the monitor layer
    hits: dict[int, float]  # capped layer -> positions it capped in this step, for the layers sent


def encode(ids: list[str], monitor: bool, layers: list[int], payload: np.ndarray) -> list[bytes]:
    header = {"ids": ids, "monitor": monitor, "layers": layers}
    return [json.dumps(header).encode(), payload.astype(np.float64, copy=False).tobytes()]


def decode(frames: list[bytes]) -> StepReport:
    header = json.loads(frames[0])
    values = np.frombuffer(frames[1], dtype=np.float64)
    n = len(header["ids"])
    positions = values[:n].astype(np.int64)
    projections = values[n:2 * n] if header["monitor"] else None
    hits = dict(zip(header["layers"], values[2 * n:].tolist()))
    return StepReport(header["ids"], positions, projections, hits)


class ReportSender:
    """The worker's end: a thread that waits for each step's copy to land, then sends it."""

    def __init__(self, address: str, monitor: bool, layers: list[int]):
        self.monitor, self.layers = monitor, layers
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._socket = zmq.Context.instance().socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(address)
        threading.Thread(target=self._run, name="axiscap-reports", daemon=True).start()

    def put(self, ids: list[str], ready: torch.Event | None, host: torch.Tensor) -> None:
        """``host`` is being filled by a non-blocking copy that ``ready`` marks (None: already done)."""
        self._queue.put((ids, ready, host))

    def _run(self) -> None:
        while True:
            ids, ready, host = self._queue.get()
            if ready is not None:
                ready.synchronize()
            self._socket.send_multipart(encode(ids, self.monitor, self.layers, host.numpy()))
