"""The HTTP application: routes, error objects and the engine's life cycle."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from axiscap.steering import AssistantAxis

from .config import Settings
from .engine import Engine
from .metrics import ServingMetrics, projection_buckets
from .model_loading import LoadedModel
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body
from .serving import CHAT, COMPLETION, OpenAIServing

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    settings: Settings
    loaded: LoadedModel
    axis: AssistantAxis
    metrics: ServingMetrics
    engine: Engine
    serving: OpenAIServing


def build_state(settings: Settings, loaded: LoadedModel, axis: AssistantAxis) -> ServerState:
    def stat(key):
        return float(axis.extra[key]) if key in axis.extra else None

    tau = axis.threshold(axis.monitor_layer)
    buckets = projection_buckets(stat("monitor_mean"), stat("monitor_std"), tau)
    metrics = ServingMetrics(loaded.name, axis.cap_layers, buckets, tau, settings.max_waiting)
    engine = Engine(loaded, axis, metrics, settings.max_batch_size, settings.max_waiting,
                    settings.prefill_chunk_tokens)
    return ServerState(settings, loaded, axis, metrics, engine, OpenAIServing(engine, loaded, settings))


def _validation_message(errors) -> tuple[str, str | None]:
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    param = ".".join(loc) or None
    return (f"{param}: {first['msg']}" if param else first["msg"]), param


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine.start()
        log.info("serving %s (capping by default: %s)", state.loaded.name, state.settings.capping_default)
        yield
        state.engine.stop()

    app = FastAPI(title="axiscap", lifespan=lifespan)
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
        return reject(exc.status_code, error_body(str(exc.detail), "invalid_request_error"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return reject(500, error_body("internal server error", "server_error"))

    async def parse(http: Request, model):
        try:
            payload = await http.json()
        except ValueError:
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            return model.model_validate(payload)
        except ValidationError as exc:
            message, param = _validation_message(exc.errors())
            raise APIError(400, message, param=param) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        body = await parse(http, ChatCompletionRequest)
        if body.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        return await serving.respond(CHAT, body, serving.chat_prompt_ids(body), http)

    @app.post("/v1/completions")
    async def completions(http: Request):
        body = await parse(http, CompletionRequest)
        if body.echo or body.logprobs:
            raise APIError(400, "echo and logprobs are not supported", param="echo" if body.echo else "logprobs")
        return await serving.respond(COMPLETION, body, serving.completion_prompt_ids(body), http)

    @app.get("/v1/models")
    async def models():
        return serving.models()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.loaded.name, "capping_default": state.settings.capping_default,
                "cap_layers": state.axis.cap_layers, "monitor_layer": state.axis.monitor_layer}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
