"""vLLM's tokenizer endpoints, at the root as vLLM serves them."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request

from ..auth import require_api_key
from ..protocol import (DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest, TokenizeCompletionRequest,
                        TokenizeResponse)
from . import state

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/tokenize")
async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest, http: Request) -> TokenizeResponse:
    # Off the event loop: a megabyte of prompt takes the tokenizer a second.
    return await asyncio.to_thread(state(http).tokenization.tokenize, body)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, http: Request) -> DetokenizeResponse:
    return state(http).tokenization.detokenize(body)
