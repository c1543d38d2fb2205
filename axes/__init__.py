"""Axis files shipped for models, and the pipeline that builds and calibrates them."""

from __future__ import annotations

from pathlib import Path


def shipped_axis(model: str) -> Path | None:
    """The axis file shipped for ``model`` (by its served name), if there is one."""
    candidate = Path(__file__).parent / f"{model}.safetensors"
    return candidate if candidate.is_file() else None
