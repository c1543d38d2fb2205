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

import torch

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
