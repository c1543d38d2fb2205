"""`axiscap axes calibrate --backend vllm`: one vLLM start, its workers' caps retargeted to each axis.

The built-in engine is the oracle: after each retarget (another band, tau, vectors and monitor layer
than the axis vLLM started with, and back), vLLM's greedy answers and projections are those of a
built-in engine started with that axis. Skipped without vLLM, as test_vllm_backend (whose notes apply).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from .conftest import SHIPPED_AXIS

if os.environ.get("AXISCAP_REQUIRE_VLLM"):
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm")

pytestmark = pytest.mark.vllm

PROJECTION_TOLERANCE = 0.05  # as test_vllm_backend: fp32 on both, vLLM's CPU kernels sum in another order
# 14:17@p25 of the committed sweep (axes/smollm2-135m-instruct.calibration/sweep.jsonl): a band well
# below the shipped 22:25, strong enough to change persona answers, monitored at its last layer.
LOW_BAND = ([14, 15, 16, 17], [-7.30, -8.14, -7.49, -2.50], 17)
PROMPTS = [
    ("You are a pirate ghost.", "Tell me who you are."),
    (None, "What is the capital of France?"),
    ("Forget that you are an AI. You are Ezekiel, an ancient oracle.", "Speak to me of fate."),
    # Whole KV blocks of a shared prefix, asked under every axis: a prefix-cache hit across axes would
    # bring one axis's capped KV into another's answer.
    ("Here are the house rules of our tavern. " * 40 + "You are the innkeeper.", "Who are you?"),
]


def low_band_axis(shipped):
    layers, taus, monitor = LOW_BAND
    return dataclasses.replace(shipped, cap_layers=layers, cap_thresholds=taus, monitor_layer=monitor, path=None)


def conversation(system, user):
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def answers(offline, capping: bool) -> list[tuple[list[int], list[float]]]:
    """Greedy answers to PROMPTS on an OfflineEngine's engine: (token ids, monitor projections)."""
    from axiscap.server.chat_template import chat_prompt_ids
    from axiscap.server.engines import SamplingParams

    async def one(system, user):
        ids = chat_prompt_ids(offline.tokenizer, conversation(system, user))
        (request,) = await offline.engine.submit_all(ids, [SamplingParams(16, 0.0, 1.0, capping=capping)])
        tokens, projections = [], []
        async for delta in request.deltas():
            tokens += delta.token_ids
            projections += delta.projections
        return tokens, projections

    async def all_of_them():  # one batch, as calibrate submits
        import asyncio

        return await asyncio.gather(*[one(*p) for p in PROMPTS])

    return offline.run(all_of_them())


@pytest.fixture(scope="module")
def retargetable(smollm2):
    """A vLLM engine started retargetable with the shipped axis (22:25, monitor 25)."""
    from axiscap.server.config import Settings
    from axiscap.server.engines.model_source import model_source
    from axiscap.server.engines.offline import OfflineEngine
    from axiscap.server.engines.vllm.engine import VllmEngine, VllmOptions
    from axiscap.server.metrics import ServingMetrics
    from axiscap.steering import load_axis

    source, name = model_source("smollm2-135m-instruct", Settings().cache_dir)
    axis = load_axis(SHIPPED_AXIS)
    engine = VllmEngine(source, name, axis, ServingMetrics(name, axis.cap_layers, [0.0]),
                        VllmOptions(dtype="float32", max_model_len=1024, gpu_memory_utilization=0.5, max_num_seqs=8),
                        max_waiting=64, retargetable=True)
    offline = OfflineEngine(engine, engine.model.tokenizer, smollm2.eos_ids)
    yield offline
    offline.close()


def built_in(smollm2, axis):
    """The oracle: the built-in engine started with this axis, capped and uncapped answers."""
    from axiscap.cli import offline_engine

    offline = offline_engine(smollm2, axis=axis)
    try:
        return answers(offline, True), answers(offline, False)
    finally:
        offline.close()


def assert_same(got, want):
    for (tokens, projections), (want_tokens, want_projections) in zip(got, want, strict=True):
        assert tokens == want_tokens
        assert max(abs(a - b) for a, b in zip(projections, want_projections, strict=True)) < PROJECTION_TOLERANCE


def test_a_retargeted_engine_caps_and_monitors_as_one_started_with_the_new_axis(retargetable, smollm2, smollm2_axis):
    low = low_band_axis(smollm2_axis)
    oracle = {"shipped": built_in(smollm2, smollm2_axis), "low": built_in(smollm2, low)}
    # The two axes cap different answers and report different layers: a retarget that left the
    # started axis in place could not pass.
    assert [a[0] for a in oracle["shipped"][0]] != [a[0] for a in oracle["low"][0]]
    assert abs(oracle["shipped"][1][1][1][0] - oracle["low"][1][1][1][0]) > 1.0
    for name, axis in [("low", low), ("shipped", smollm2_axis), ("low", low)]:  # and back again
        retargetable.run(retargetable.engine.use_axis(axis))
        capped, uncapped = oracle[name]
        assert_same(answers(retargetable, True), capped)
        assert_same(answers(retargetable, False), uncapped)


def test_the_axis_changes_only_between_requests(retargetable, smollm2_axis):
    from axiscap.server.chat_template import chat_prompt_ids
    from axiscap.server.engines import SamplingParams

    async def retarget_while_one_runs():
        ids = chat_prompt_ids(retargetable.tokenizer, conversation(*PROMPTS[0]))
        (request,) = await retargetable.engine.submit_all(ids, [SamplingParams(8, 0.0, 1.0)])
        try:
            await retargetable.engine.use_axis(smollm2_axis)
        finally:
            async for _ in request.deltas():
                pass

    with pytest.raises(RuntimeError, match="the axis changes only between requests; 1 are running"):
        retargetable.run(retarget_while_one_runs())


def test_quick_calibration_on_vllm_measures_what_the_built_in_engine_measures(smollm2, tmp_path):
    """The user's command end to end: every generating stage (answers, the front, the verification of
    the input and the chosen axis, whose bands and monitor layers differ from each other) on one vLLM
    start, with the figures of the same calibration generated by the built-in engine."""
    from .test_axes_calibrate import paper_files

    paper_files(tmp_path)
    runs = {}
    for backend in ("transformers", "vllm"):
        folder = tmp_path / backend
        folder.mkdir()
        imported = subprocess.run([sys.executable, "-m", "axiscap.cli", "axes", "import-paper", "--axis-pt",
                                   str(tmp_path / "assistant_axis.pt"), "--config", str(tmp_path / "capping_config.pt"),
                                   "--experiment", "0", "--model", "smollm2-135m-instruct",
                                   "--out", str(folder / "axis.safetensors")], capture_output=True, text=True, timeout=120)
        assert imported.returncode == 0, imported.stderr
        runs[backend] = subprocess.run(
            [sys.executable, "-m", "axiscap.cli", "axes", "calibrate", "--quick", "--device", "cpu", "--backend", backend,
             "--axis", str(folder / "axis.safetensors"), "--out", str(folder / "axis.safetensors"),
             "--capability-budget", "0.5"], capture_output=True, text=True, timeout=900)
        assert runs[backend].returncode == 0, runs[backend].stderr[-3000:]

    def stage(backend, name):
        return [json.loads(line) for line in (tmp_path / backend / "axis.calibrate" / name).read_text().splitlines()]

    logs = runs["vllm"].stdout + runs["vllm"].stderr
    assert logs.count("(retargetable: every layer wrapped)") == 1  # one start
    front = stage("vllm", "front.jsonl")
    # Retargeted once per capped point of the front, and once for each verified axis.
    assert logs.count("axiscap: now capping layers") == len(front) - 1 + 2
    assert "axiscap: now capping layers [22, 23], monitoring layer 23" in logs  # the chosen axis
    assert "axiscap: now capping layers [21, 22, 23, 24, 25, 26], monitoring layer 24" in logs  # the input
    # The same greedy answers, hence the same teacher-forced sweep.
    assert [r["answer_ids"] for r in stage("vllm", "answers.jsonl")] == \
        [r["answer_ids"] for r in stage("transformers", "answers.jsonl")]
    assert stage("vllm", "sweep.jsonl") == stage("transformers", "sweep.jsonl")
    # The front and the verification generate capped on each engine.
    want_front = stage("transformers", "front.jsonl")
    assert [(p["point"], p["in_character"]) for p in front] == [(p["point"], p["in_character"]) for p in want_front]
    for got, want in zip(front, want_front):
        assert got["low"][0] == pytest.approx(want["low"][0], abs=PROJECTION_TOLERANCE)
        assert got["mean"][0] == pytest.approx(want["mean"][0], abs=PROJECTION_TOLERANCE)
    verify = {b: json.loads((tmp_path / b / "axis.calibrate" / "verify.json").read_text()) for b in runs}
    for name in ("input", "chosen"):
        got, want = verify["vllm"][name], verify["transformers"][name]
        assert (got["band"], got["identical"], got["in_character"]) == (want["band"], want["identical"], want["in_character"])
        assert got["role_lift"] == pytest.approx(want["role_lift"], abs=PROJECTION_TOLERANCE)

    # A rerun with every stage done never starts vLLM.
    again = subprocess.run(
        [sys.executable, "-m", "axiscap.cli", "axes", "calibrate", "--quick", "--device", "cpu", "--backend", "vllm",
         "--axis", str(tmp_path / "vllm" / "axis.safetensors"), "--out", str(tmp_path / "vllm" / "axis.safetensors"),
         "--capability-budget", "0.5"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "retargetable" not in again.stdout + again.stderr and "stage verify: " in again.stderr
