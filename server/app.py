"""The HTTP application: routes, operator policy (keys, limits), error objects and the engine's life cycle."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import AutoConfig

from axiscap.steering import AssistantAxis, AxisFileError, load_axis

from .config import Settings
from .engines import EngineClient, ServedModel
from .engines.hf.engine import Engine
from .engines.hf.model_loading import LoadedModel, kv_cache_budget, load_model
from .engines.model_source import model_source
from .limits import BodySizeLimit, read_timeout_protocol
from .metrics import ServingMetrics, projection_buckets
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse,
                       ModelList, TokenizeChatRequest, TokenizeCompletionRequest, TokenizeResponse, VersionResponse,
                       error_body)
from .serving import ChatShape, CompletionShape, OpenAIServing

log = logging.getLogger(__name__)

PLAYGROUND = Path(__file__).parent / "playground"


@dataclass
class ServerState:
    settings: Settings
    model: ServedModel
    axis: AssistantAxis
    metrics: ServingMetrics
    engine: EngineClient
    serving: OpenAIServing


def _metrics(settings: Settings, axis: AssistantAxis, model_name: str) -> ServingMetrics:
    def stat(key):
        return float(axis.extra[key]) if key in axis.extra else None

    tau = axis.threshold(axis.monitor_layer)
    buckets = projection_buckets(stat("monitor_mean"), stat("monitor_std"), tau)
    if not settings.persona_metrics:
        log.warning("/metrics leaves out the projection histogram, tokens below tau and cap activations: "
                    "projections are withheld from clients (--no-allow-projections) and /metrics is open; "
                    "set --metrics-key to export them to Prometheus alone")
    return ServingMetrics(model_name, axis.cap_layers, buckets, tau, settings.max_waiting,
                          persona_series=settings.persona_metrics)


def build_state(settings: Settings, loaded: LoadedModel, axis: AssistantAxis) -> ServerState:
    """The transformers backend, around a model already loaded."""
    metrics = _metrics(settings, axis, loaded.name)
    kv_tokens = kv_cache_budget(loaded, settings.kv_cache_tokens, settings.gpu_memory_utilization)
    log.info("KV cache budget: %d tokens (%.1f GiB)", kv_tokens, kv_tokens * loaded.kv_bytes_per_token() / 2**30)
    engine = Engine(loaded, axis, metrics, settings.max_batch_size, settings.max_waiting,
                    settings.prefill_chunk_tokens, kv_tokens, settings.max_request_kv_share)
    return ServerState(settings, loaded, axis, metrics, engine, OpenAIServing(engine, loaded, settings))


def load_state(settings: Settings, axis_path: Path) -> ServerState:
    """The backend the settings name, with its model and this axis (a missing file fails before any load)."""
    if not axis_path.is_file():
        raise AxisFileError(axis_path, "no such file")
    if settings.backend == "vllm":
        return build_vllm_state(settings, axis_path)
    loaded = load_model(settings.model, settings.device, settings.dtype, settings.cache_dir,
                        settings.served_model_name)
    axis = load_axis(axis_path, loaded.n_layers, loaded.model.config.get_text_config().hidden_size)
    return build_state(settings, loaded, axis)


def build_vllm_state(settings: Settings, axis_path: str | Path) -> ServerState:
    """The vLLM backend: checks the axis against the model's config, then starts vLLM (minutes)."""
    try:
        from .engines.vllm.engine import VllmEngine, VllmOptions
    except ImportError as exc:  # vLLM is an optional extra
        raise RuntimeError(f"--backend vllm needs vLLM 0.32 ({exc}): pip install 'axiscap[vllm]'") from None

    source, name = model_source(settings.model, settings.cache_dir)
    config = AutoConfig.from_pretrained(source).get_text_config()
    axis = load_axis(axis_path, config.num_hidden_layers, config.hidden_size)
    name = settings.served_model_name or name
    metrics = _metrics(settings, axis, name)
    options = VllmOptions(settings.tensor_parallel_size, settings.pipeline_parallel_size,
                          settings.gpu_memory_utilization, settings.max_model_len, settings.max_num_seqs, settings.dtype,
                          settings.distributed_executor_backend)
    engine = VllmEngine(source, name, axis, metrics, options, settings.max_waiting, settings.max_request_kv_share)
    return ServerState(settings, engine.model, axis, metrics, engine, OpenAIServing(engine, engine.model, settings))


_UNION_TAGS = {"str", "int", "bool", "float", "dict", "list", "none"}


def _validation_message(errors) -> tuple[str, str | None]:
    """The first error as OpenAI puts it: a message and the parameter's dotted path."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    # pydantic names the union member it tried ("str", "function-after[...]"): not part of the path.
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and str(p) not in _UNION_TAGS and "[" not in str(p)]
    param = ".".join(loc) or None
    msg = first["msg"].removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


def create_app(state: ServerState) -> FastAPI:
    settings = state.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine.start()
        log.info("serving %s (capping policy: %s, default: %s; %d API keys)", state.model.name,
                 settings.capping_policy, settings.capping_default, len(settings.api_keys))
        yield
        state.engine.stop()

    # redirect_slashes off: "/v1/models/" gets a 404 error object, not a bare 307. No /docs or /redoc:
    # FastAPI's pages load their scripts from a CDN; the OpenAPI document itself is served below.
    app = FastAPI(title="axiscap", lifespan=lifespan, redirect_slashes=False, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, metrics=state.metrics)
    app.state.axiscap = state
    serving, metrics = state.serving, state.metrics

    def reject(status: int, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.reject(status)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return reject(exc.status, exc.body(), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc.errors())
        return reject(400, error_body(message, "invalid_request_error", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = f"{request.method} is not allowed on {request.url.path}" if exc.status_code == 405 \
            else str(exc.detail)
        return reject(exc.status_code, error_body(message, "invalid_request_error"), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return reject(500, error_body("internal server error", "server_error"))

    keys = [k.encode() for k in settings.api_keys]

    async def authorized(http: Request) -> None:
        """Bearer keys, compared in constant time; with no keys configured the server is open."""
        if keys and not _bearer_is_one_of(http, keys):
            raise APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(authorized)]

    # Tokenizing runs in a thread (the tokenizer lets go of the GIL): a megabyte of prompt takes a
    # second, and on the event loop every stream would stall for it.
    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        prompt_ids = await asyncio.to_thread(serving.chat_prompt_ids, body.messages)
        return await serving.respond(ChatShape(serving, body, prompt_ids), http)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, http: Request):
        prompt_ids = await asyncio.to_thread(serving.completion_prompt_ids, body)
        return await serving.respond(CompletionShape(serving, body, prompt_ids), http)

    # HEAD answers like GET (without a body) where monitors probe; it stays out of the OpenAPI document.
    @app.head("/v1/models", dependencies=guarded, include_in_schema=False)
    @app.get("/v1/models", dependencies=guarded)  # registered first: a 405's Allow header names it
    async def models() -> ModelList:
        return serving.models()

    # vLLM's tokenizer endpoints, at the root as vLLM serves them.
    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        return await asyncio.to_thread(serving.tokenize, body)

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return serving.detokenize(body)

    @app.get("/openapi.json", dependencies=guarded, include_in_schema=False)
    async def openapi_document():
        return JSONResponse(app.openapi())

    @app.get("/version")
    async def version() -> VersionResponse:
        return serving.version()

    health_guard = guarded if settings.protect_health else []

    @app.head("/health", dependencies=health_guard, include_in_schema=False)
    @app.get("/health", dependencies=health_guard)
    async def health():
        engine = state.engine
        axis = state.axis
        body = {"status": "ok" if engine.healthy else "unavailable", "model": state.model.name,
                "capping_policy": settings.capping_policy, "capping_default": settings.capping_default,
                "allow_projections": settings.allow_projections, "cap_layers": axis.cap_layers,
                "monitor_layer": axis.monitor_layer, "monitor_tau": axis.threshold(axis.monitor_layer)}
        for key in ("monitor_mean", "monitor_std"):  # the default Assistant's spread, when the file has it
            if key in axis.extra:
                body[key] = float(axis.extra[key])
        if engine.device_error:
            body["device_error"] = engine.device_error
        return JSONResponse(body, status_code=200 if engine.healthy else 503)

    if settings.playground:
        # A static page that calls the public API from the browser, like any client (see playground/).
        @app.head("/playground", include_in_schema=False)
        @app.get("/playground", include_in_schema=False)
        async def playground():
            return FileResponse(PLAYGROUND / "index.html")

        app.mount("/playground/static", StaticFiles(directory=PLAYGROUND), name="playground")

    scrape_key = settings.metrics_key.encode() if settings.metrics_key else None

    async def scraper(http: Request) -> None:
        """The scrape credential, and only it, opens /metrics when one is set (a client key does not)."""
        if scrape_key is not None and not _bearer_is_one_of(http, [scrape_key]):
            raise APIError(401, "/metrics needs the scrape credential: send 'Authorization: Bearer <metrics key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.head("/metrics", dependencies=[Depends(scraper)], include_in_schema=False)
    @app.get("/metrics", dependencies=[Depends(scraper)])
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _bearer_is_one_of(http: Request, keys: list[bytes]) -> bool:
    """Whether the request's Bearer token is one of ``keys`` (compared in constant time)."""
    scheme, _, token = http.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and any(secrets.compare_digest(token.strip().encode(), k) for k in keys)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def uvicorn_config(app: FastAPI, host: str, port: int, log_level: str):
    """How uvicorn serves ``app``: HTTP/1.1 with read timeouts for headers and body (``limits``)."""
    import uvicorn

    state: ServerState = app.state.axiscap
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          http=read_timeout_protocol(state.settings.read_timeout, lambda: state.metrics.reject(408)))


@contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", timeout: float = 30.0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread of this process (tests, ``axiscap eval``); yields its base URL."""
    import uvicorn

    port = free_port(host)
    server = uvicorn.Server(uvicorn_config(app, host, port, "warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
