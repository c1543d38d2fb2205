"""POST /v1/chat/completions, /v1/completions and /v1/responses; GET and DELETE /v1/responses/{id}."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ..auth import require_api_key
from ..protocol import ChatCompletionRequest, CompletionRequest, ResponsesRequest
from . import state

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, http: Request):
    return await state(http).chat.create(body, http)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, http: Request):
    return await state(http).completion.create(body, http)


@router.post("/v1/responses")
async def responses(body: ResponsesRequest, http: Request):
    return await state(http).responses.create(body, http)


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, http: Request):
    return state(http).responses.retrieve(response_id, http)


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, http: Request):
    return state(http).responses.delete(response_id, http)
