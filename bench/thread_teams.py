"""Decode speed on a second thread, with and without a main thread that has run parallel torch ops.

The measurement behind ``server/engines/hf/threads.py``: each case runs in a fresh process, loads
SmolLM2 on the main thread, and decodes greedily with a DynamicCache on a new thread, as the engine
does; the last case first runs parallel ops on a thread that then ends, as ``compute_thread`` does. Prints JSON: ms per token for each case, and the machine.

    python bench/thread_teams.py --tokens 60
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASES = {
    "main_thread_only": "main",
    "engine_thread_after_parallel_main": "thread",
    "engine_thread_main_reserved": "reserved",
    # main reserved, and a thread that ran parallel ops with every thread has ended (axes build's stages)
    "engine_thread_after_compute_thread_ended": "compute_thread",
}

CHILD = r"""
import sys, threading, time, torch
from transformers import DynamicCache
mode, tokens = sys.argv[1], int(sys.argv[2])
from axiscap.server.engines.hf.threads import reserve_threads_for_engine, take_reserved_threads
if mode in ("reserved", "compute_thread"):
    reserve_threads_for_engine()
from axiscap.server.engines.hf.model_loading import load_model
model = load_model("smollm2-135m-instruct", device="cpu").model
torch.mm(torch.randn(576, 576), torch.randn(576, 576))  # any parallel op on the main thread
if mode == "compute_thread":
    def compute():
        take_reserved_threads()
        torch.mm(torch.randn(2048, 2048), torch.randn(2048, 2048))
    worker = threading.Thread(target=compute); worker.start(); worker.join()
def decode(out):
    take_reserved_threads()
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=torch.arange(40)[None], past_key_values=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(tokens):
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        out.append((time.perf_counter() - start) / tokens * 1000)
out = []
if mode == "main":
    decode(out)
else:
    thread = threading.Thread(target=decode, args=(out,)); thread.start(); thread.join()
print(round(out[0], 1))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=60)
    args = parser.parse_args()
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from serve import machine

    figures = {}
    for name, mode in CASES.items():
        run = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.tokens)], capture_output=True, text=True,
                             check=True)
        figures[name] = float(run.stdout.split()[-1])
    print(json.dumps({"machine": machine(), "tokens": args.tokens, "ms_per_token": figures}, indent=2))


if __name__ == "__main__":
    main()
