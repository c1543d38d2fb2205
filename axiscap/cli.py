"""The ``axiscap`` command: serve a model with capping, and make axis files."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from axiscap.axes import axis_for
from axiscap.evals.cli import add_parser as add_eval_parser
from axiscap.steering import AxisFileError


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from axiscap.server.app import create_app, load_state, uvicorn_config
    from axiscap.server.config import Settings

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    axis_path = axis_for(settings.model, settings.axis)
    state = load_state(settings, axis_path)
    logging.getLogger("axiscap").info("axis %s: capping layers %s, monitoring layer %d",
                                      axis_path, state.axis.cap_layers, state.axis.monitor_layer)
    app = create_app(state)
    uvicorn.Server(uvicorn_config(app, settings.host, settings.port, settings.log_level)).run()


def _import_paper(args: argparse.Namespace) -> None:
    from axiscap.axes.paper_import import import_paper_axis
    from axiscap.steering import save_axis

    axis = import_paper_axis(args.axis_pt, args.config, args.experiment, args.model, args.monitor_layer)
    save_axis(axis, args.out)
    print(f"wrote {args.out}: capped layers {axis.cap_layers}, monitor layer {axis.monitor_layer}")


def engine_generate(loaded, max_batch_size: int = 16):
    """The server's engine, without an axis, as the builder's batched generate function."""
    import asyncio
    import itertools

    from axiscap.server.chat_template import chat_prompt_ids
    from axiscap.server.engines.hf.engine import Engine
    from axiscap.server.metrics import ServingMetrics
    from axiscap.server.engines import SamplingParams

    engine = Engine(loaded, None, ServingMetrics(loaded.name, [], [0.0]), max_batch_size=max_batch_size,
                    max_waiting=1 << 20)
    seeds = itertools.count()

    def generate(conversations, temperature, top_p, max_tokens):
        async def one(messages):
            ids = chat_prompt_ids(loaded.tokenizer, messages)
            request = await engine.submit(ids, SamplingParams(max_tokens, temperature, top_p, seed=next(seeds)))
            answer = []
            async for delta in request.deltas():
                answer += delta.token_ids
            return ids, [t for t in answer if t not in engine.eos_ids]

        async def run_all():
            return await asyncio.gather(*[one(m) for m in conversations])

        return asyncio.run(run_all())

    return engine, generate


def _build(args: argparse.Namespace) -> None:
    from axiscap.axes.pipeline import BuildConfig, build
    from axiscap.axes.role_scoring import EmbeddingScorer, JudgeScorer
    from axiscap.server.engines.hf.model_loading import load_model

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loaded = load_model(args.model, device=args.device, cache_dir=args.cache_dir)
    band = tuple(int(x) for x in args.band.split(":")) if args.band else None
    cfg = BuildConfig(model_name=loaded.name, out=args.out, quick=args.quick, percentile=args.percentile,
                      band=band, monitor_layer=args.monitor_layer, max_new_tokens=args.max_new_tokens,
                      questions=args.questions, prompts_per_role=args.prompts_per_role, min_in_role=args.min_in_role)
    engine, generate = engine_generate(loaded)
    engine.start()
    try:
        scorer = JudgeScorer(args.judge_url, args.judge_model) if args.judge_url else EmbeddingScorer()
        path = build(cfg, loaded.model, loaded.tokenizer, generate, scorer.score)
    finally:
        engine.stop()
    print(f"wrote {path} (stages in {cfg.work})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="axiscap",
        description="OpenAI-compatible LLM server that caps activations along the Assistant Axis "
                    "(Lu et al. 2026) and exports per-token axis projections as Prometheus metrics.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="serve a model over the OpenAI API",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics. "
                    "Every flag can also be set as an AXISCAP_<FLAG> environment variable.")
    serve.add_argument("--model", help="Hugging Face id or local path (default: the embedded "
                                       "smollm2-135m-instruct)")
    serve.add_argument("--axis", type=Path, help="axis file (default: the shipped axis of the embedded model)")
    serve.add_argument("--served-model-name", help="name clients put in 'model'")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--backend", choices=["transformers", "vllm"],
                       help="transformers (default): the built-in engine, for CPU and the embedded model; "
                            "vllm: vLLM's engine, for GPUs and large models")
    serve.add_argument("--device", help="cpu, cuda, cuda:N, balanced (a model too large for one GPU, its "
                                        "layers split over all visible GPUs) or auto (default)")
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                       help="weights and activations (default: bfloat16 on CUDA, float32 on CPU)")
    serve.add_argument("--capping-default", action=argparse.BooleanOptionalAction, default=None,
                       help="cap requests that do not set 'capping' (default on)")
    serve.add_argument("--max-batch-size", type=int, help="requests decoded together (default 16)")
    serve.add_argument("--max-waiting", type=int, help="queued requests before 429 (default 64)")
    serve.add_argument("--prefill-chunk-tokens", type=int,
                       help="prompt tokens prefilled between two decode steps, so long prompts do not "
                            "stall running streams (default 512)")
    serve.add_argument("--default-max-tokens", type=int, help="budget when a request sets none (default 1024)")
    serve.add_argument("--max-n", type=int, help="choices one request may ask for with 'n' (default 8)")
    serve.add_argument("--max-prompt-logprobs-tokens", type=int,
                       help="n x prompt tokens a completions request with echo and logprobs may ask logprobs for; "
                            "each costs the output head over the whole vocabulary (default 4096)")
    serve.add_argument("--cache-dir", type=Path, help="where the de-quantized default model is kept "
                                                      "(default ~/.cache/axiscap)")
    serve.add_argument("--log-level", help="debug, info, warning (default info)")

    limits = serve.add_argument_group("memory and limits")
    limits.add_argument("--max-model-len", type=int, help="prompt + completion tokens one request may use "
                                                         "(default: the model's context window)")
    limits.add_argument("--kv-cache-tokens", type=int,
                        help="KV cache tokens for all running requests together; requests wait for room, and one "
                             "that can never fit gets 400 (default: from free GPU memory, 65536 on CPU)")
    limits.add_argument("--gpu-memory-utilization", type=float,
                        help="share of the GPU memory free after loading that the KV cache may take (default 0.9)")
    limits.add_argument("--max-request-kv-share", type=float,
                        help="share of the KV cache one request (all its n choices, prompt + max_tokens) may reserve; "
                             "a larger one gets 400, so one client cannot hold every other (default 0.5)")
    limits.add_argument("--max-body-bytes", type=int, help="larger request bodies get 413 (default 2 MiB)")
    limits.add_argument("--read-timeout", type=float,
                        help="seconds a client has to send a request's headers, and again its body; then it gets "
                             "408 and its connection closes, so slow senders cannot hold connections (default 30)")
    limits.add_argument("--request-timeout", type=float,
                        help="seconds a request may take, queueing included; then it ends with a timeout "
                             "error (default 600)")

    vllm = serve.add_argument_group(
        "vLLM backend", "With --backend vllm (pip install 'axiscap[vllm]'), vLLM runs the model: paged KV cache, "
                        "CUDA graphs, tensor and pipeline parallelism; capping runs inside its workers. These "
                        "flags and --gpu-memory-utilization, --max-model-len go to vLLM under vLLM's own names; "
                        "--max-batch-size, --prefill-chunk-tokens, --kv-cache-tokens and --device do not apply.")
    vllm.add_argument("--tensor-parallel-size", type=int, help="GPUs each layer is split over (default 1)")
    vllm.add_argument("--pipeline-parallel-size", type=int, help="stages the layers are split into, on one or "
                                                               "several nodes (default 1)")
    vllm.add_argument("--max-num-seqs", type=int, help="requests in vLLM's running batch (default: vLLM's)")
    vllm.add_argument("--distributed-executor-backend", choices=["mp", "ray"],
                      help="how vLLM starts its workers (default: vLLM's choice); ray for several nodes, which also "
                           "opens the projection reports socket beyond loopback (its messages stay signed)")

    policy = serve.add_argument_group(
        "operator policy", "What clients may do. A server in front of untrusted clients should set API keys, "
                           "--capping-policy always and --no-allow-projections (the deploy/ files do).")
    policy.add_argument("--api-key", dest="api_keys", action="append", metavar="KEY",
                        help="accept this Bearer key; repeat for several (env AXISCAP_API_KEYS, comma-separated). "
                             "Without any, the API is open")
    policy.add_argument("--protect-health", action=argparse.BooleanOptionalAction, default=None,
                        help="require a key for /health too (default off, for probes)")
    policy.add_argument("--metrics-key", metavar="KEY",
                        help="the scrape credential: /metrics then answers only 'Authorization: Bearer KEY' (client "
                             "keys do not open it); give Prometheus the same value. Under --no-allow-projections, "
                             "the per-token persona series are exported only with it")
    policy.add_argument("--protect-metrics", action=argparse.BooleanOptionalAction, default=None,
                        help="refuse to start without --metrics-key, so /metrics is never left open (default off)")
    policy.add_argument("--capping-policy", choices=["client", "always", "never"],
                        help="client (default): a request's 'capping' field decides, else --capping-default; "
                             "always / never: the server decides, and a response whose request asked otherwise "
                             "says 'capping_overridden': true")
    policy.add_argument("--allow-projections", action=argparse.BooleanOptionalAction, default=None,
                        help="let clients ask for per-token axis projections with 'return_projections' "
                             "(default on; off answers such requests 403: projections help tune jailbreaks)")
    policy.add_argument("--playground", action=argparse.BooleanOptionalAction, default=None,
                        help="serve /playground, a page that streams capped and uncapped answers side by side "
                             "through the public API (default on; it holds no secrets: visitors need a key)")
    serve.set_defaults(run=_serve)

    axes = commands.add_parser("axes", help="make axis files").add_subparsers(dest="axes_command", required=True)
    imp = axes.add_parser(
        "import-paper", help="convert the paper's published axis and capping config",
        description="Convert assistant_axis.pt + capping_config.pt (lu-christina/assistant-axis-vectors) "
                    "into an axiscap axis file. Their role-ward vectors and cap ceilings become "
                    "Assistant-ward axes and floors.")
    imp.add_argument("--axis-pt", required=True, type=Path, help="assistant_axis.pt")
    imp.add_argument("--config", required=True, type=Path, help="capping_config.pt")
    imp.add_argument("--experiment", required=True,
                     help="experiment id, e.g. layers_46:54-p0.25, or its index in the config (0 is the first)")
    imp.add_argument("--model", required=True, help="the model the axis belongs to (recorded in the file)")
    imp.add_argument("--monitor-layer", type=int,
                     help="layer to monitor (default: the paper's target layer for its models, else the "
                          "middle of the capped band)")
    imp.add_argument("--out", required=True, type=Path, help="output .safetensors")
    imp.set_defaults(run=_import_paper)

    build = axes.add_parser(
        "build", help="build and calibrate an axis for a model, stage by stage (resumable)",
        description="Generate answers under default-Assistant and role-play prompts (axes/data) on the "
                    "server's engine, average each answer's decoder-layer outputs, score role expression "
                    "0-3, take axis = default - mean of fully-in-role role vectors, choose the capped band "
                    "and calibrate tau. Stages whose output exists in OUT's .build folder are skipped.")
    build.add_argument("--model", default="smollm2-135m-instruct", help="model id or path")
    build.add_argument("--out", required=True, type=Path, help="output axis file (.safetensors)")
    build.add_argument("--quick", action="store_true", help="a tiny slice of every stage (tests, smoke runs)")
    build.add_argument("--percentile", type=float, default=25.0, help="tau percentile (default 25)")
    build.add_argument("--band", help="capped layers FIRST:LAST (default: the documented rule)")
    build.add_argument("--monitor-layer", type=int, help="monitor layer (default: the band's last)")
    build.add_argument("--max-new-tokens", type=int, default=64, help="tokens per answer (default 64)")
    build.add_argument("--questions", type=int, default=10, help="questions per prompt (default 10)")
    build.add_argument("--prompts-per-role", type=int, default=2, help="system prompts per role (default 2)")
    build.add_argument("--min-in-role", type=int, default=3, help="fully-in-role answers a role needs (default 3)")
    build.add_argument("--judge-url", help="score role expression with an LLM judge at this OpenAI-compatible "
                                           "base URL (e.g. http://host:8000/v1) instead of the offline scorer")
    build.add_argument("--judge-model", default="gpt-4o-mini", help="the judge's model name")
    build.add_argument("--device", default="auto", help="cpu, cuda or auto")
    build.add_argument("--cache-dir", type=Path, default=None, help="model cache (default ~/.cache/axiscap)")
    build.set_defaults(run=_build)

    add_eval_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (AxisFileError, RuntimeError, ValueError, OSError) as exc:  # bad input, missing model or file
        print(f"axiscap: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
