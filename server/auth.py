"""Who may call what: client API keys for the API, a scrape credential of its own for /metrics.
Both are Bearer tokens compared in constant time; with no client keys configured the API is open."""

from __future__ import annotations

import hashlib
import secrets

from fastapi import Request

from .protocol import APIError
from .routes import state


async def require_api_key(http: Request) -> None:
    keys = state(http).settings.api_keys
    if keys and not _bearer_is_one_of(http, keys):
        raise APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def require_api_key_for_health(http: Request) -> None:
    """Probes call /health without a key unless the operator protects it (--protect-health)."""
    if state(http).settings.protect_health:
        await require_api_key(http)


async def require_scrape_key(http: Request) -> None:
    """The scrape credential, and only it, opens /metrics when one is set (a client key does not)."""
    key = state(http).settings.metrics_key
    if key and not _bearer_is_one_of(http, [key]):
        raise APIError(401, "/metrics needs the scrape credential: send 'Authorization: Bearer <metrics key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def key_owner(http: Request) -> str:
    """Who owns what this request stores (a stored response): its Authorization header, hashed, so
    that one key never reads or deletes another's. With an open API every client is one owner."""
    return hashlib.sha256(http.headers.get("authorization", "").encode()).hexdigest()


def _bearer_is_one_of(http: Request, keys: list[str]) -> bool:
    """Whether the request's Bearer token is one of ``keys`` (compared in constant time)."""
    scheme, _, token = http.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and any(secrets.compare_digest(token.strip().encode(), k.encode())
                                              for k in keys)
