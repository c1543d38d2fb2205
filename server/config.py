"""Server settings: CLI flags override ``AXISCAP_*`` environment variables, which override defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AXISCAP_", protected_namespaces=())

    model: str = Field(DEFAULT_MODEL_NAME, description="Hugging Face id or local path; the default is the embedded SmolLM2")
    served_model_name: str | None = Field(None, description="name clients use in 'model' (default: derived from --model)")
    axis: Path | None = Field(None, description="axis file (default: the shipped axis of the embedded model)")
    host: str = "127.0.0.1"
    port: int = 8000
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers (CPU, the embedded model) or vllm (GPUs; pip install 'axiscap[vllm]')")
    device: str = Field("auto", description="cpu, cuda, cuda:N, balanced (layers split over all GPUs) or auto")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    capping_default: bool = Field(True, description="capping for requests that do not say")
    max_batch_size: int = Field(16, ge=1, description="requests decoded together at most")
    max_waiting: int = Field(64, ge=0, description="queued requests beyond the batch before 429")
    prefill_chunk_tokens: int = Field(512, ge=1, description="prompt tokens prefilled between two decode steps")
    default_max_tokens: int = Field(1024, ge=1, description="completion budget when a request sets none")
    max_n: int = Field(8, ge=1, description="choices one request may ask for with 'n'")
    max_prompt_logprobs_tokens: int = Field(
        4096, ge=1, description="n x prompt tokens a completions request with echo and logprobs may ask logprobs for")
    cache_dir: Path = Field(Path.home() / ".cache" / "axiscap", description="where converted models are kept")
    log_level: str = "info"

    # Operator policy: what clients may do. The deploy/ files set the safe values.
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Bearer keys clients must send (AXISCAP_API_KEYS: comma-separated); none: open")
    protect_health: bool = Field(False, description="require a key for /health too (probes then need one)")
    metrics_key: str | None = Field(
        None, description="the scrape credential: /metrics then answers only 'Authorization: Bearer <it>' "
                          "(client keys do not open it); configure Prometheus with the same value")
    protect_metrics: bool = Field(False, description="refuse to start without --metrics-key (a deployment's guard "
                                                     "that /metrics is never left open)")
    capping_policy: Literal["client", "always", "never"] = Field(
        "client", description="client: a request's 'capping' decides; always/never: the server decides")
    allow_projections: bool = Field(True, description="let clients ask for per-token axis projections")
    playground: bool = Field(True, description="serve the side-by-side page at /playground (it calls the API "
                                               "with the visitor's key, like any client)")
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="request bodies larger than this get 413")
    request_timeout: float = Field(600.0, gt=0, description="seconds a request may take, queue included")
    read_timeout: float = Field(30.0, gt=0, description="seconds a client has to send its request's headers, and "
                                                        "again its body; then 408 and the connection closes")

    # Memory: how much context one request and all requests together may hold.
    max_model_len: int | None = Field(None, ge=2, description="prompt + completion tokens per request "
                                                               "(default: the model's context window)")
    kv_cache_tokens: int | None = Field(None, ge=2, description="KV cache tokens for all running requests "
                                                                "(default: from free GPU memory; on CPU 65536)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of free GPU memory the KV cache may use")
    max_request_kv_share: float = Field(
        0.5, gt=0, le=1, description="share of the KV cache one request (all its n choices, prompt + max_tokens) may "
                                     "reserve; a larger one gets 400, so one client cannot hold every other")

    # The vLLM backend's own settings, under vLLM's names.
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs each layer is split over")
    pipeline_parallel_size: int = Field(1, ge=1, description="vLLM: stages the layers are split into")
    max_num_seqs: int | None = Field(None, ge=1, description="vLLM: requests in the running batch (default vLLM's)")
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None, description="vLLM: how workers start (default vLLM's choice); ray for workers on several nodes, which "
                          "also opens the projection reports socket beyond loopback (messages stay signed)")

    @model_validator(mode="after")
    def _metrics_key_given(self):
        if self.protect_metrics and not self.metrics_key:
            raise ValueError("--protect-metrics needs --metrics-key (AXISCAP_METRICS_KEY): /metrics takes a scrape "
                             "credential of its own, not a client's API key")
        return self

    @property
    def persona_metrics(self) -> bool:
        """Whether /metrics may carry per-token persona series (projection histogram, tokens below tau,
        cap activations). Around its own request a client could read its projections back from them,
        so they are exported only where clients may have projections anyway, or where only the scrape
        credential opens /metrics."""
        return self.allow_projections or bool(self.metrics_key)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v):
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v
