"""The HTTP application: middleware, OpenAI error objects, the routers (``routes/``) and the engine's
life cycle; ``state`` builds what it serves."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .limits import BodySizeLimit, read_timeout_protocol
from .protocol import APIError, error_body, validation_message
from .request_id import RequestIdMiddleware
from .routes import generation, models, operations, tokenization
from .state import ServerState

log = logging.getLogger(__name__)


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
    # FastAPI's pages load their scripts from a CDN; the OpenAPI document itself is a route (operations).
    app = FastAPI(title="axiscap", lifespan=lifespan, redirect_slashes=False, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, metrics=state.metrics)
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer, refusals included, carries the id
    app.state.axiscap = state
    metrics = state.metrics

    def reject(status: int, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.reject(status)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return reject(exc.status, exc.body(), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
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

    for module in (generation, models, tokenization, operations):
        app.include_router(module.router)
    if settings.playground:
        app.include_router(operations.playground)
        app.mount("/playground/static", StaticFiles(directory=operations.PLAYGROUND), name="playground")
    return app


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
