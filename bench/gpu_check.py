"""GPU acceptance check, in one script that fits a lent GPU's few minutes (target: under 8 on one
H200) with nothing but torch, transformers and the project's own wheel: a random-weight model of a
real shape (Llama-3-8B by default) in bf16, built from its config on the device, and

1. capping on the device against the reference formula, layer by layer; the retargetable caps of
   ``axes calibrate --backend vllm`` replayed from a CUDA graph after each retarget;
2. a mixed batch (capping on and off) against each request alone, greedy;
3. the built-in engine's throughput at concurrency 1, 8 and 64 (capping on, and off at 8) next to
   the memory-bandwidth ceiling measured on the same device;
4. whether vLLM is installed (it cannot be on the lent machines; where it is, run the vLLM tests
   there with VLLM_GPU_SYNC_CHECK=error).

Prints one JSON document; a step that fails records its error and the rest go on, and steps past
--max-seconds are skipped.

    python bench/gpu_check.py --tokenizer TOKENIZER_DIR                       # on the GPU machine
    python bench/gpu_check.py --tokenizer TOKENIZER_DIR --shape tiny --device cpu --dtype float32  # smoke run

On the lent GPU machines (torch, transformers, accelerate, safetensors, prometheus-client, httpx) carry
the project's wheel and those of what its engine imports beyond them: pydantic-settings,
python-dotenv, xgrammar and apache-tvm-ffi (``pip download --no-deps`` them here, then ``pip install
--no-deps`` there). TOKENIZER_DIR is any Hugging Face tokenizer folder; SmolLM2's, saved from the
local cache, is 3 MB:
    python -c "from transformers import AutoTokenizer as T; import os; \
T.from_pretrained(os.path.expanduser('~/.cache/axiscap/models/smollm2-135m-instruct')).save_pretrained('tok')"
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import platform
import time
import traceback

import torch

SHAPES = {
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048),
}
PROMPT_TOKENS, DECODE_TOKENS = 32, 128


def build(shape: str, tokenizer_dir: str, device: str, dtype: torch.dtype):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from axiscap.server.engines.hf.model_loading import LoadedModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return LoadedModel(model.to(dtype).eval(), tokenizer, f"random-{shape}")


def random_axis(model):
    """A random axis over the last third of the layers, tau at the median projection of random text,
    so the cap bites on about half the positions (the hardest case for the kernels)."""
    from axiscap.steering import AssistantAxis, record_layer_outputs

    n, hidden = model.config.num_hidden_layers, model.config.hidden_size
    band = list(range(2 * n // 3, n))
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(n, hidden, generator=g)
    ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=g).to(model.device)
    with torch.inference_mode(), record_layer_outputs(model, band) as seen:
        model(input_ids=ids)
    taus = [float((seen[l][0].float() @ (raw[l] / raw[l].norm()).to(model.device)).median()) for l in band]
    return AssistantAxis(raw, band, taus, band[len(band) // 2], model.name_or_path or "random", 50.0, ids.numel())


def capping_against_the_formula(loaded, axis) -> dict:
    from axiscap.steering import AxisHooks, cap, record_layer_outputs

    model = loaded.model
    ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode(), record_layer_outputs(model, axis.cap_layers) as before:
        hooks = AxisHooks(model, axis)
        try:
            with record_layer_outputs(model, axis.cap_layers) as after:
                hooks.set_cap_mask(torch.ones(1, 1, dtype=torch.bool, device=model.device))
                model(input_ids=ids.to(model.device))
            hits = hooks.cap_hits.tolist()
        finally:
            hooks.remove()
    worst = 0.0
    for l in axis.cap_layers:
        h = before[l][0].float()
        want = cap(h, axis.unit(l).to(h.device), axis.threshold(l))
        worst = max(worst, float((after[l][0].float() - want).abs().max() / h.abs().max()))
    return {"layers": axis.cap_layers, "positions_capped_per_layer": hits,
            "max_error_relative_to_largest_activation": worst, "ok": worst < 2e-2 and sum(hits) > 0}


def retargeted_caps_in_a_cuda_graph(device: str, dtype: torch.dtype, hidden: int, n_layers: int = 8,
                                    tokens: int = 64) -> dict:
    """The caps ``axes calibrate --backend vllm`` retargets between requests (``steering.split_residual``,
    retargetable), replayed from one captured CUDA graph as vLLM replays them: after each retarget
    (another band, tau, vectors and monitor layer, and back) the replay must give what an eager fresh
    install of that axis gives. Layers with vLLM's split residual, random weights. On a CPU: eager."""
    from torch import nn

    from axiscap.steering import AssistantAxis
    from axiscap.steering.split_residual import install_split_residual_caps, retarget_split_residual_caps

    class SplitLayer(nn.Module):  # vLLM's contract: the stream after the layer is hidden + residual
        def __init__(self):
            super().__init__()
            self.mix = nn.Linear(hidden, hidden, bias=False)

        def forward(self, positions, h, residual):
            return torch.tanh(self.mix(h)), h + residual

    torch.manual_seed(4)
    with torch.device(device):
        base = [SplitLayer().to(dtype) for _ in range(n_layers)]
    g = torch.Generator().manual_seed(5)
    axes = [AssistantAxis(torch.randn(n_layers, hidden, generator=g), band, [0.0] * len(band), monitor, "random", 50.0, 1)
            for band, monitor in (([2, 3, 4], 4), ([5, 6], 6))]
    h0 = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    r0 = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    mask = (torch.arange(tokens) % 2).float().to(device)  # every other token asks for capping

    def run(layers):
        h, r = h0, r0
        for layer in layers:
            h, r = layer(None, h, r)
        return h + r

    def installed(axis, retargetable=False):
        layers = nn.ModuleList(base)
        state = install_split_residual_caps(layers, axis, range(n_layers), tokens, torch.device(device), dtype,
                                            retargetable)
        state.mask[:tokens] = mask
        return layers, state

    layers, state = installed(axes[0], retargetable=True)
    graph = None
    with torch.inference_mode():
        if device.startswith("cuda"):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                run(layers)  # warm-up off the capture, as torch.cuda.graph asks
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = run(layers)
        rows = []
        for axis in (axes[1], axes[0], axes[1]):
            retarget_split_residual_caps(layers, axis, dtype)
            state.hits.zero_()
            if graph is not None:
                graph.replay()
            else:
                out = run(layers)
            fresh, fresh_state = installed(axis)
            want = run(fresh)
            scale = float(want.float().abs().max())
            rows.append({"band": axis.cap_layers, "monitor": axis.monitor_layer,
                         "max_error_relative": float((out.float() - want.float()).abs().max()) / scale,
                         "projections_max_error": float((state.projections[:tokens] -
                                                         fresh_state.projections[:tokens]).abs().max()),
                         "hits": state.hits[axis.cap_layers].tolist(), "fresh_hits": fresh_state.hits.tolist()})
    return {"cuda_graph": graph is not None, "hidden": hidden, "retargets": rows,
            "ok": all(r["max_error_relative"] < 1e-3 and r["projections_max_error"] < 1e-3 * hidden ** 0.5
                      and r["hits"] == r["fresh_hits"] and sum(r["hits"]) > 0 for r in rows)}


async def _generate(engine, prompts: list[list[int]], cappings: list[bool], max_tokens: int,
                    ignore_eos: bool = False) -> list[list[int]]:
    from axiscap.server.engines import SamplingParams

    async def one(ids, capping):
        request = await engine.submit(ids, SamplingParams(max_tokens, temperature=0, capping=capping,
                                                          ignore_eos=ignore_eos))
        return [t for d in [d async for d in request.deltas()] for t in d.token_ids]

    return await asyncio.gather(*[one(p, c) for p, c in zip(prompts, cappings)])


def prompts(vocab: int, n: int, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (n, PROMPT_TOKENS), generator=g).tolist()


def mixed_batch(engine, vocab: int) -> dict:
    batch = prompts(vocab, 8)
    cappings = [i % 2 == 0 for i in range(8)]
    together = asyncio.run(_generate(engine, batch, cappings, 16, ignore_eos=True))
    alone = [asyncio.run(_generate(engine, [p], [c], 16, ignore_eos=True))[0] for p, c in zip(batch, cappings)]
    # bf16 sums in another order at another batch shape: report how far rows agree, do not demand all.
    agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(together, alone)]
    return {"requests": 8, "tokens_each": 16, "identical_requests": sum(a == 16 for a in agree),
            "tokens_agreeing_before_first_difference": agree}


def device_bandwidth(device: str) -> float | None:
    """Bytes per second of a large on-device copy (read + write)."""
    if not device.startswith("cuda"):
        return None
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * 20 * x.numel() / (time.perf_counter() - start)


def throughput(engine, loaded, bandwidth: float | None) -> list[dict]:
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    kv_per_token = loaded.kv_bytes_per_token()
    rows = []
    for c, capping in [(1, True), (8, True), (8, False), (64, True)]:
        batch = prompts(loaded.vocab_size, c, seed=10 + c)
        asyncio.run(_generate(engine, batch[:1], [capping], 4, ignore_eos=True))  # warm-up
        start = time.perf_counter()
        asyncio.run(_generate(engine, batch, [capping] * c, DECODE_TOKENS, ignore_eos=True))
        wall = time.perf_counter() - start
        row = {"concurrency": c, "capping": capping, "output_tokens_per_s": round(c * DECODE_TOKENS / wall, 1)}
        if bandwidth:
            # Each decode step reads every weight once and each row's KV cache (on average half-way through).
            step_bytes = weights + c * (PROMPT_TOKENS + DECODE_TOKENS / 2) * kv_per_token
            ceiling = c * bandwidth / step_bytes
            row |= {"bandwidth_ceiling_tokens_per_s": round(ceiling, 1),
                    "share_of_ceiling": round(row["output_tokens_per_s"] / ceiling, 3)}
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer folder")
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--max-seconds", type=float, default=420, help="steps that would start later are skipped")
    args = parser.parse_args()

    from axiscap.server.engines.hf.engine import Engine
    from axiscap.server.metrics import ServingMetrics

    began = time.monotonic()
    report: dict = {"machine": {"platform": platform.platform(), "torch": torch.__version__, "device": args.device,
                                "device_name": torch.cuda.get_device_name(args.device)
                                if args.device.startswith("cuda") else platform.processor()},
                    "shape": args.shape, "dtype": args.dtype, "steps": {}}

    def step(name: str, run):
        if time.monotonic() - began > args.max_seconds:
            report["steps"][name] = {"skipped": f"past --max-seconds ({args.max_seconds:g})"}
            return None
        start = time.monotonic()
        try:
            result = run()
        except Exception as exc:  # one step's failure is a finding; the others still run
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
        report["steps"][name] = {"seconds": round(time.monotonic() - start, 1),
                                 **(result if isinstance(result, dict) else {"rows": result})}
        print(f"{name}: done in {report['steps'][name]['seconds']} s", flush=True)
        return result

    loaded = step("build", lambda: {"model": build(args.shape, args.tokenizer, args.device, getattr(torch, args.dtype))})
    if loaded is None or "model" not in loaded:
        print(json.dumps(report, indent=2, default=str))
        return
    loaded = loaded["model"]
    report["steps"]["build"]["parameters_billions"] = round(sum(p.numel() for p in loaded.model.parameters()) / 1e9, 2)
    report["steps"]["build"].pop("model")
    axis = random_axis(loaded.model)
    step("capping_against_the_formula", lambda: capping_against_the_formula(loaded, axis))
    step("retargeted_caps_in_a_cuda_graph", lambda: retargeted_caps_in_a_cuda_graph(
        args.device, getattr(torch, args.dtype), loaded.model.config.hidden_size))
    engine = Engine(loaded, axis, ServingMetrics(loaded.name, axis.cap_layers, [0.0]), max_batch_size=64,
                    max_waiting=256)
    engine.start()
    try:
        step("mixed_batch", lambda: mixed_batch(engine, loaded.vocab_size))
        bandwidth = device_bandwidth(args.device)
        report["device_copy_bandwidth_gb_per_s"] = round(bandwidth / 1e9, 1) if bandwidth else None
        step("throughput", lambda: throughput(engine, loaded, bandwidth))
    finally:
        engine.stop()
    report["steps"]["vllm"] = ({"installed": True, "next": "run tests/test_vllm_*.py with VLLM_GPU_SYNC_CHECK=error"}
                               if importlib.util.find_spec("vllm") else {"installed": False})
    report["seconds"] = round(time.monotonic() - began, 1)
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
