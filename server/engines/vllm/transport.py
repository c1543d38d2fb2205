"""How per-token projections and cap counts travel from vLLM's workers to axiscap's front end.

A side channel over ZeroMQ (PUSH in the worker, PULL in the front end), not vLLM's own output
path. vLLM's outputs pass worker -> engine core (scheduler) -> front end through fixed message
types that have no field for them; carrying them there would mean patching the scheduler and the
output processor. vLLM already depends on pyzmq and talks between its processes the same way.
One message per forward step carries every request of the batch, so the cost does not grow with
the number of capped layers, and the worker sends it from a thread after an asynchronous copy to
the host, so the step itself never waits on the device.

A message is three frames: a JSON header, the float64 payload
``[positions (n), projections (n), cap hits (k), prompt positions (m), prompt projections (m)]``,
where row i belongs to ``ids[i]`` and ``positions[i]`` is the position of the token whose hidden
state produced that request's next token, and an HMAC-SHA256 of the first two under a key made for
each start of the server. The front end keys projections by that position, so chunked prefills
(whose rows are not sampled) and recomputation after preemption need no bookkeeping on the worker.
The prompt rows are the prompt tokens this step computed for requests that asked for them, the
header's ``prompt`` saying whose, as ``[id, rows]`` in order.

The channel is private: the front end binds loopback unless workers run on other nodes, and takes
only messages signed with this start's key, each sender's sequence numbers rising, so another
process can neither forge projections and cap counts (which reach responses and /metrics) nor
replay a real message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch
import zmq


class Forged(ValueError):
    """A message whose signature or sequence number is wrong: not from this start's workers, or replayed."""


@dataclass
class StepReport:
    ids: list[str]  # axiscap request ids, one per row
    positions: np.ndarray  # int64 [n]
    projections: np.ndarray | None  # float64 [n]; None from a pipeline stage without the monitor layer
    hits: dict[int, float]  # capped layer -> positions it capped in this step, for the layers sent
    prompt_ids: list[str]  # one per prompt row
    prompt_positions: np.ndarray  # int64 [m]
    prompt_projections: np.ndarray  # float64 [m]


def new_key() -> str:
    """A signing key for one start of the server (hex)."""
    return os.urandom(32).hex()


def _signature(key: str, header: bytes, payload: bytes) -> bytes:
    return hmac.new(bytes.fromhex(key), header + b"\0" + payload, hashlib.sha256).digest()


def encode(key: str, sender: str, seq: int, ids: list[str], monitor: bool, layers: list[int],
           payload: np.ndarray, prompt: list[tuple[str, int]] = ()) -> list[bytes]:
    header = json.dumps({"sender": sender, "seq": seq, "ids": ids, "monitor": monitor, "layers": layers,
                         "prompt": [list(p) for p in prompt]}).encode()
    values = payload.astype(np.float64, copy=False).tobytes()
    return [header, values, _signature(key, header, values)]


class Receiver:
    """Checks and decodes messages: signed with this start's key, each sender's sequence rising."""

    def __init__(self, key: str):
        self.key = key
        self._last_seq: dict[str, int] = {}

    def decode(self, frames: list[bytes]) -> StepReport:
        """Raises Forged for a message that is not this start's workers' (or was seen before), and
        ValueError, KeyError, TypeError or IndexError for one that is malformed."""
        if len(frames) != 3 or not hmac.compare_digest(_signature(self.key, frames[0], frames[1]), frames[2]):
            raise Forged("bad signature")
        header = json.loads(frames[0])
        sender, seq = str(header["sender"]), int(header["seq"])
        if seq <= self._last_seq.get(sender, -1):
            raise Forged(f"replayed message {sender}#{seq}")
        self._last_seq[sender] = seq
        values = np.frombuffer(frames[1], dtype=np.float64)
        n = len(header["ids"])
        positions = values[:n].astype(np.int64)
        projections = values[n:2 * n] if header["monitor"] else None
        k = len(header["layers"])
        hits = dict(zip(header["layers"], values[2 * n:2 * n + k].tolist()))
        prompt = [(str(rid), int(rows)) for rid, rows in header.get("prompt", ())]
        m = sum(rows for _, rows in prompt)
        start = 2 * n + k
        if len(values) != start + 2 * m:
            raise ValueError(f"payload of {len(values)} values for {n} rows, {k} layers, {m} prompt rows")
        prompt_ids = [rid for rid, rows in prompt for _ in range(rows)]
        return StepReport(header["ids"], positions, projections, hits, prompt_ids,
                          values[start:start + m].astype(np.int64), values[start + m:])


class ReportSender:
    """The worker's end: a thread that waits for each step's copy to land, then signs and sends it."""

    def __init__(self, address: str, key: str, monitor: bool, layers: list[int], device: torch.device):
        self.monitor, self.layers, self.key, self.device = monitor, layers, key, device
        self.sender = os.urandom(8).hex()  # this worker's name in its messages' sequence numbers
        self._seq = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._socket = zmq.Context.instance().socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(address)
        threading.Thread(target=self._run, name="axiscap-reports", daemon=True).start()

    def put(self, ids: list[str], prompt: list[tuple[str, int]], ready: torch.Event | None,
            host: torch.Tensor) -> None:
        """``host`` is being filled by a non-blocking copy that ``ready`` marks (None: already done)."""
        self._queue.put((ids, prompt, ready, host, self.layers))  # layers as of this step (they may be retargeted)

    def _run(self) -> None:
        # A thread that waits on a device's events must bind that device first, or CUDA opens a second
        # context on device 0 for it (vLLM's own threads do the same).
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while True:
            ids, prompt, ready, host, layers = self._queue.get()
            if ready is not None:
                ready.synchronize()  # a blocking event: the thread sleeps until the copy lands
            self._socket.send_multipart(encode(self.key, self.sender, self._seq, ids, self.monitor, layers,
                                               host.numpy(), prompt))
            self._seq += 1
