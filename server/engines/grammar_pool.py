"""Grammar compiles in worker processes, each with a deadline.

xgrammar compiles in C++ and cannot be interrupted: a compile on a thread that runs past any
deadline holds its core to the end. In a process it can be killed. The pool keeps a few workers
(``--grammar-compile-workers``, default 1): compiles wait for a free one instead of taking every
core, and a worker runs at a lower CPU priority than the engine (``os.nice``), so a running
stream keeps its pace while a schema compiles beside it.

The deadline counts the worker's CPU time, not the wall clock: at its low priority, beside a busy
engine, a worker may get a tenth of a core, and a wall-clock deadline would then refuse ordinary
schemas exactly when the server is busy. What a schema may cost is its CPU; a compile is also
stopped after ``WALL_FACTOR`` times the deadline on the wall clock, so that no compile holds its
worker (and the compiles queued behind it) for long. A worker starts at its first compile (about
two seconds of imports, at normal priority and outside the deadline) and lives as long as the
server, or until its parent's end of the pipe closes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import psutil

# Added to a worker's niceness: the engine's decode steps come before compiles.
WORKER_NICENESS = 10
WORKER_CACHE_BYTES = 64 * 1024 * 1024  # the parent keeps the results; this cache only matches vLLM's path
START_TIMEOUT_S = 120.0  # a worker's imports, on a loaded machine
WALL_FACTOR = 10.0  # a compile's wall-clock bound, in deadlines
POLL_S = 0.02  # how often the parent looks at a compiling worker's CPU time


class CompileTimedOut(Exception):
    """The compile passed the deadline; its worker was killed."""

    def __init__(self, seconds: float):
        super().__init__(f"no grammar after {seconds:g} s")
        self.seconds = seconds


class CompileFailed(Exception):
    """xgrammar refused the schema (the message is xgrammar's), or the worker died (``worker_died``:
    says nothing of the schema, which may compile in the next worker)."""

    def __init__(self, message: str, seconds: float = 0.0, worker_died: bool = False):
        super().__init__(message)
        self.seconds, self.worker_died = seconds, worker_died


def _serve(conn: Connection) -> None:
    """A worker's loop: its tokenizer in and "ready" out first; then (schema, options, send_back) in,
    ("ok", serialized grammar or None, seconds) or ("error", message, seconds) out."""
    import xgrammar as xgr

    tokenizer_info = conn.recv()
    # With xgrammar's cache on, as vLLM compiles: xgrammar 0.2.8 refuses some schemas (long counted
    # repetitions) only on that path, and both backends must refuse them alike.
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.deserialize_json(tokenizer_info), max_threads=1,
                                   cache_enabled=True, cache_limit_bytes=WORKER_CACHE_BYTES)
    os.nice(WORKER_NICENESS)  # after the imports, so that a busy engine does not slow a worker's start
    conn.send("ready")
    while True:
        try:
            schema, options, send_back = conn.recv()
        except (EOFError, OSError):  # the server is gone
            return
        started = time.process_time()
        try:
            grammar = compiler.compile_json_schema(schema, **options)
            conn.send(("ok", grammar.serialize_json() if send_back else None, time.process_time() - started))
        except Exception as exc:  # xgrammar's own RuntimeError / ValueError subclasses
            conn.send(("error", str(exc), time.process_time() - started))


class _Worker:
    def __init__(self, tokenizer_info: str):
        self._tokenizer_info = tokenizer_info
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None

    def run(self, job: tuple[str, dict[str, Any], bool], timeout: float) -> tuple[str | None, float]:
        """Blocking (on a thread of the event loop's executor): one compile, within ``timeout`` CPU
        seconds; the serialized grammar and the compile's CPU seconds."""
        try:
            if self._process is None or self._process.poll() is not None:
                self.stop()  # reaps one that died
                self._start()
            cpu, started = self._cpu_seconds(), time.monotonic()
            self._conn.send(job)
            while not self._conn.poll(POLL_S):
                if self._cpu_seconds() - cpu > timeout or time.monotonic() - started > timeout * WALL_FACTOR:
                    self._replace()
                    raise CompileTimedOut(timeout)
            status, value, seconds = self._conn.recv()
        # It died (ValueError: a message cut short; psutil.Error: no such process).
        except (EOFError, OSError, ValueError, psutil.Error):
            self.stop()
            raise CompileFailed("the grammar compiler's worker process ended", worker_died=True) from None
        if status == "error":
            raise CompileFailed(value, seconds)
        return value, seconds

    def _start(self) -> None:
        # A fresh interpreter, not a fork of one that runs torch threads, and not multiprocessing's
        # spawn, which would run the server's main script again in the child.
        ours, theirs = socket.socketpair()
        self._process = subprocess.Popen([sys.executable, "-m", __name__, str(theirs.fileno())],
                                         pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send(self._tokenizer_info)
        if not self._conn.poll(START_TIMEOUT_S) or self._conn.recv() != "ready":
            raise EOFError
        self._usage = psutil.Process(self._process.pid)

    def _replace(self) -> None:
        """Kill it and start another now, so that the next compile does not wait for the start."""
        self.stop()
        try:
            self._start()
        except (EOFError, OSError, psutil.Error):
            self.stop()  # the next compile starts one

    def _cpu_seconds(self) -> float:
        times = self._usage.cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._conn.close()
            self._process = self._conn = None


class CompilePool:
    def __init__(self, tokenizer_info: str, workers: int, timeout: float):
        self.timeout = timeout
        self._workers = [_Worker(tokenizer_info) for _ in range(workers)]
        self._idle: asyncio.Queue[_Worker] | None = None  # made on the event loop, at the first compile

    async def compile(self, schema: str, options: dict[str, Any], send_back: bool) -> tuple[str | None, float]:
        """The compiled grammar, serialized (or None where not ``send_back``), and the compile's
        seconds; raises CompileTimedOut or CompileFailed. Waits for a free worker first."""
        if self._idle is None:
            self._idle = asyncio.Queue()
            for worker in self._workers:
                self._idle.put_nowait(worker)
        worker = await self._idle.get()
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(None, worker.run, (schema, options, send_back), self.timeout)
        # Back to the idle queue when its compile has ended, not when a caller stops waiting for it.
        job.add_done_callback(lambda _: self._idle.put_nowait(worker))
        return await asyncio.shield(job)

    def stop(self) -> None:
        for worker in self._workers:
            worker.stop()


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
