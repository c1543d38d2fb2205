"""GET /v1/models and /version."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ..auth import require_api_key
from ..protocol import ModelList, VersionResponse
from . import state

router = APIRouter()


# HEAD answers like GET (without a body) where monitors probe; it stays out of the OpenAPI document.
@router.head("/v1/models", dependencies=[Depends(require_api_key)], include_in_schema=False)
@router.get("/v1/models", dependencies=[Depends(require_api_key)])  # registered first: a 405's Allow names it
async def models(http: Request) -> ModelList:
    return state(http).models.models()


@router.get("/version")
async def version(http: Request) -> VersionResponse:
    return state(http).models.version()
