"""Server settings: CLI flags override ``AXISCAP_*`` environment variables, which override defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AXISCAP_", protected_namespaces=())

    model: str = Field(DEFAULT_MODEL_NAME, description="Hugging Face id or local path; the default is the embedded SmolLM2")
    served_model_name: str | None = Field(None, description="name clients use in 'model' (default: derived from --model)")
    axis: Path | None = Field(None, description="axis file (default: the shipped axis of the embedded model)")
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = Field("auto", description="cpu, cuda, cuda:N, balanced (layers split over all GPUs) or auto")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    capping_default: bool = Field(True, description="capping for requests that do not say")
    max_batch_size: int = Field(16, ge=1, description="requests decoded together at most")
    max_waiting: int = Field(64, ge=0, description="queued requests beyond the batch before 429")
    prefill_chunk_tokens: int = Field(512, ge=1, description="prompt tokens prefilled between two decode steps")
    default_max_tokens: int = Field(1024, ge=1, description="completion budget when a request sets none")
    cache_dir: Path = Field(Path.home() / ".cache" / "axiscap", description="where converted models are kept")
    log_level: str = "info"
