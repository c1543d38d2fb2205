"""The HTTP routes, one module per endpoint family, each an APIRouter that ``app`` includes. A route
finds its serving object through ``state(request)``: the ``ServerState`` the app was built around,
typed, so a reader (or an IDE) follows a request from its route into its serving."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

if TYPE_CHECKING:
    from ..state import ServerState


def state(http: Request) -> ServerState:
    return http.app.state.axiscap
