"""/v1/models and /version."""

from __future__ import annotations

from typing import Literal

from .shared import _Response


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "axiscap"


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VersionResponse(_Response):
    version: str
