"""Axis files shipped for models, and the pipeline that builds and calibrates them."""

from __future__ import annotations

from pathlib import Path


def shipped_axis(model: str) -> Path | None:
    """The axis file shipped for ``model`` (by its served name), if there is one."""
    candidate = Path(__file__).parent / f"{model}.safetensors"
    return candidate if candidate.is_file() else None


def axis_for(model: str, given: str | Path | None = None) -> Path:
    """The axis file to serve ``model`` with: the one given, else the shipped one."""
    path = given or shipped_axis(model)
    if path is None:
        raise ValueError(f"no axis for model {model!r}: pass --axis FILE "
                         "(make one with 'axiscap axes build' or 'axiscap axes import-paper')")
    return Path(path)
