"""One OpenMP thread team in the process: the engine thread's.

Measured with torch 2.13 on 2 cores: once the main thread has run one parallel op (loading the model
is enough), decoding on another thread takes 1.7 times as long per token (SmolLM2 batch 1: 56 against
33 ms), because each thread that enters a parallel region gets an OpenMP team of its own, and with
more OpenMP threads than cores libgomp stops letting idle workers spin, so every op then waits on a
wake-up. ``set_num_threads`` afterwards does not undo it; a main thread that has never had a team does.
So a server gives the main thread one thread before it touches torch, and the engine thread takes
the count the process started with (``bench/thread_teams.py`` measures both ways).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

_engine_threads: int | None = None


def reserve_threads_for_engine() -> None:
    """On the main thread, before any torch work: from now on it runs torch ops on one thread."""
    global _engine_threads
    if _engine_threads is None:
        _engine_threads = torch.get_num_threads()
        torch.set_num_threads(1)


def take_reserved_threads() -> None:
    """On the engine thread: all the intra-op threads, if the main thread gave them up."""
    if _engine_threads is not None:
        torch.set_num_threads(_engine_threads)


def in_compute_thread(work: Callable[[], T]) -> T:
    """Run ``work`` on a thread of its own with every intra-op thread, and wait for it.

    For batch tools (``axes build``, ``calibrate``, ``check``) whose main thread reserved its threads
    for the engine but that also run large forward passes of their own between generations: the
    OpenMP team the work needs belongs to a thread that then ends, not to the main thread for good.
    Seen in a SmolLM2 build on 2 cores: the report stage's generation, after the activation and
    calibration passes, ran at the generate stage's speed (83-100 s per 64 answers, both);
    ``bench/thread_teams.py``'s compute_thread case measures it on its own."""
    outcome: list = []

    def run() -> None:
        take_reserved_threads()
        try:
            outcome.append((True, work()))
        except BaseException as exc:  # handed to the caller's thread
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="axiscap-compute", daemon=True)  # daemon: Ctrl-C still exits
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
