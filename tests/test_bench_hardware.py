"""bench/hardware.py: the machine's decode limit the serving benchmark judges every server against."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .conftest import tiny_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # the scripts import their neighbours

import hardware  # noqa: E402
import serve  # noqa: E402


def test_weights_read_a_token_count_a_tied_embedding_once():
    model = tiny_model("llama")
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's are
    unique = sum(p.numel() for p in model.parameters()) * 4  # parameters() yields a shared one once
    assert hardware.weight_bytes(model) == unique
    assert unique < (sum(p.numel() for p in model.state_dict().values()) * 4)  # the state dict has it twice
    limit = hardware.decode_limit(model, 10.0)
    assert limit == {"read_gb_s": 10.0, "weight_mb": round(unique / 1e6, 1), "dtype": "float32",
                     "tok_s_limit": round(10e9 / unique, 1)}


def test_the_machine_names_its_cpu_and_math_libraries():
    m = hardware.machine()
    assert m["cpu_model"] and m["cpu_model"] != "x86_64" or not Path("/proc/cpuinfo").exists()
    assert m["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert m["torch_threads"] == torch.get_num_threads()
    assert hardware.read_bandwidth_gb_s(megabytes=16, repeats=2) > 0


def test_the_benchmark_reports_each_server_against_the_limit_at_concurrency_1():
    report = json.loads((ROOT / "bench/results/smollm2-cpu-2core-all.json").read_text())
    assert "the machine's limit" not in serve.render(report)  # a run from before the limit was measured
    report["decode_limit"] = {"read_gb_s": 25.0, "weight_mb": 538.1, "dtype": "float32", "tok_s_limit": 46.5}
    at_1 = serve.summarize(report)[1]["by_contender"]
    built_in = at_1["axiscap_capping_on"]
    assert built_in["over_bandwidth_limit"] == round(built_in["tok_s_median"] / 46.5, 3)
    assert "over_bandwidth_limit" not in serve.summarize(report)[8]["by_contender"]["axiscap_capping_on"]
    assert ("- c=1 against this machine's limit (25.0 GB/s memory read over 538.1 MB of float32 weights a token: "
            "46.5 tok/s; a quantized model reads fewer bytes): axiscap built-in, capping off ") in serve.render(report)
