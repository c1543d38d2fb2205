"""What operators and their tools call: /health, /metrics, /openapi.json and the /playground page."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..auth import require_api_key, require_api_key_for_health, require_scrape_key
from . import state

PLAYGROUND = Path(__file__).parent.parent / "playground"

router = APIRouter()


@router.head("/health", dependencies=[Depends(require_api_key_for_health)], include_in_schema=False)
@router.get("/health", dependencies=[Depends(require_api_key_for_health)])
async def health(http: Request):
    served = state(http)
    engine, axis, settings = served.engine, served.axis, served.settings
    body = {"status": "ok" if engine.healthy else "unavailable", "model": served.model.name,
            "capping_policy": settings.capping_policy, "capping_default": settings.capping_default,
            "allow_projections": settings.allow_projections, "gated_capping": engine.gated_capping,
            "cap_layers": axis.cap_layers,
            "monitor_layer": axis.monitor_layer, "monitor_tau": axis.monitor_tau}
    # The default Assistant's spread, when the file has it.
    body |= {key: value for key, value in (("monitor_mean", axis.monitor_mean), ("monitor_std", axis.monitor_std))
             if value is not None}
    if engine.device_error:
        body["device_error"] = engine.device_error
    return JSONResponse(body, status_code=200 if engine.healthy else 503)


@router.head("/metrics", dependencies=[Depends(require_scrape_key)], include_in_schema=False)
@router.get("/metrics", dependencies=[Depends(require_scrape_key)])
async def prometheus_metrics(http: Request):
    return Response(generate_latest(state(http).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/openapi.json", dependencies=[Depends(require_api_key)], include_in_schema=False)
async def openapi_document(http: Request):
    return JSONResponse(http.app.openapi())


# A static page that calls the public API from the browser, like any client; ``app`` includes it only
# where the operator serves it (--playground).
playground = APIRouter(include_in_schema=False)


@playground.head("/playground")
@playground.get("/playground")
async def playground_page():
    return FileResponse(PLAYGROUND / "index.html")
