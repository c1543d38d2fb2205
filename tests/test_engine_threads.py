"""The serving process keeps torch's intra-op threads for the engine thread (server/engines/hf/threads.py).

Run in a fresh interpreter, as `axiscap serve` starts: a main thread that has run one parallel op
makes every later decode on the engine thread slower (``bench/thread_teams.py`` measures how much),
so what is checked here is the arrangement itself: the model's forward passes run on the engine
thread with all the threads the process started with, and the main thread is left with one.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.model

SCRIPT = r"""
import asyncio, json, threading, torch
from axiscap.axes import axis_for
from axiscap.server.config import Settings
from axiscap.server.engines import SamplingParams
from axiscap.server.state import load_state

started_with = torch.get_num_threads()
settings = Settings()
state = load_state(settings, axis_for(settings.model, settings.axis))
forwards = []
state.model.model.register_forward_pre_hook(
    lambda module, args: forwards.append((threading.current_thread().name, torch.get_num_threads())))
state.engine.start()

async def generate():
    request = await state.engine.submit(state.model.tokenizer("Hello there")["input_ids"],
                                        SamplingParams(4, temperature=0))
    return [d async for d in request.deltas()]

asyncio.run(generate())
state.engine.stop()
print(json.dumps({"started_with": started_with, "main_after_start": torch.get_num_threads(),
                  "forwards": sorted(set(map(tuple, forwards)))}))
"""


def test_forward_passes_run_on_the_engine_thread_with_every_intra_op_thread():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["forwards"] == [["axiscap-engine", seen["started_with"]]]
    assert seen["main_after_start"] == 1


BATCH_TOOL = r"""
import json, threading, torch
from axiscap.server.engines.offline import built_in
from axiscap.server.engines.hf.model_loading import load_model
from axiscap.server.engines.hf.threads import in_compute_thread, reserve_threads_for_engine

started_with = torch.get_num_threads()
reserve_threads_for_engine()
loaded = load_model("smollm2-135m-instruct", device="cpu")
forwards = []
loaded.model.model.register_forward_pre_hook(
    lambda module, args: forwards.append((threading.current_thread().name, torch.get_num_threads())))
offline = built_in(loaded)
generate = offline.generate
question = [[{"role": "user", "content": "Hello there"}]]
generate(question, 0.0, 1.0, 2)
with torch.inference_mode():
    width = in_compute_thread(lambda: loaded.model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1])
try:
    in_compute_thread(lambda: 1 / 0)
    raised = None
except ZeroDivisionError as exc:
    raised = type(exc).__name__
generate(question, 0.0, 1.0, 2)
offline.close()
print(json.dumps({"started_with": started_with, "main": torch.get_num_threads(), "width": width, "raised": raised,
                  "forwards": sorted(set(map(tuple, forwards)))}))
"""


def test_batch_tools_run_their_own_passes_on_a_compute_thread_and_leave_main_with_one():
    """`axes build` / `calibrate` / `check`: the engine generates and the tool's own forward passes
    run on a thread of their own, both with every thread; an error there reaches the caller."""
    run = subprocess.run([sys.executable, "-c", BATCH_TOOL], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    n = seen["started_with"]
    assert seen["forwards"] == [["axiscap-compute", n], ["axiscap-engine", n]]
    assert seen["main"] == 1 and seen["width"] == 49152 and seen["raised"] == "ZeroDivisionError"
