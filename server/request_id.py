"""Request ids: an incoming ``X-Request-Id`` is kept (as vLLM keeps it), else one is made; every
response echoes it, and log lines about a request name it (never its content), so an operator can
find a client's request from the header its client saw."""

from __future__ import annotations

import re
import uuid

from fastapi import Request

HEADER = b"x-request-id"
_ACCEPTED = re.compile(rb"[\x21-\x7e]{1,128}")  # visible ASCII, bounded: it is written to logs


class RequestIdMiddleware:
    """Pure ASGI, so streams and disconnects pass through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((value for name, value in scope["headers"] if name == HEADER), None)
        rid = given if given is not None and _ACCEPTED.fullmatch(given) else uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = rid.decode()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (HEADER, rid)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def request_id(http: Request) -> str | None:
    return getattr(http.state, "request_id", None)
