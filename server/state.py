"""What a server runs on, and building it for either backend (the composition root behind ``app``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig

from axiscap.steering import AssistantAxis, AxisFileError, load_axis

from .config import Settings
from .engines import EngineClient, ServedModel
from .engines.hf.engine import Engine
from .engines.hf.model_loading import LoadedModel, kv_cache_budget, load_model
from .engines.hf.threads import reserve_threads_for_engine
from .engines.model_source import model_source
from .engines.vllm import engine_module
from .metrics import ServingMetrics, projection_buckets
from .serving_chat import OpenAIServingChat
from .serving_completion import OpenAIServingCompletion
from .serving_models import OpenAIServingModels
from .serving_responses import OpenAIServingResponses
from .serving_tokenization import OpenAIServingTokenization

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    settings: Settings
    model: ServedModel
    axis: AssistantAxis
    metrics: ServingMetrics
    engine: EngineClient
    # One serving object per endpoint family, all on the same engine.
    chat: OpenAIServingChat
    completion: OpenAIServingCompletion
    tokenization: OpenAIServingTokenization
    models: OpenAIServingModels
    responses: OpenAIServingResponses

    @classmethod
    def around(cls, settings: Settings, model: ServedModel, axis: AssistantAxis, metrics: ServingMetrics,
               engine: EngineClient) -> ServerState:
        servings = (kind(engine, model, settings, axis, metrics) for kind in (OpenAIServingChat, OpenAIServingCompletion,
                                                               OpenAIServingTokenization, OpenAIServingModels,
                                                               OpenAIServingResponses))
        return cls(settings, model, axis, metrics, engine, *servings)


def _metrics(settings: Settings, axis: AssistantAxis, model_name: str) -> ServingMetrics:
    tau = axis.monitor_tau
    buckets = projection_buckets(axis.monitor_mean, axis.monitor_std, tau)
    if not settings.persona_metrics:
        log.warning("/metrics leaves out the projection histogram, tokens below tau and cap activations: "
                    "projections are withheld from clients (--no-allow-projections) and /metrics is open; "
                    "set --metrics-key to export them to Prometheus alone")
    return ServingMetrics(model_name, axis.cap_layers, buckets, tau, settings.max_waiting,
                          persona_series=settings.persona_metrics)


def build_state(settings: Settings, loaded: LoadedModel, axis: AssistantAxis) -> ServerState:
    """The transformers backend, around a model already loaded."""
    metrics = _metrics(settings, axis, loaded.name)
    kv_tokens = kv_cache_budget(loaded, settings.kv_cache_tokens, settings.gpu_memory_utilization)
    log.info("KV cache budget: %d tokens (%.1f GiB)", kv_tokens, kv_tokens * loaded.kv_bytes_per_token() / 2**30)
    engine = Engine(loaded, axis, metrics, settings.max_batch_size, settings.max_waiting,
                    settings.prefill_chunk_tokens, kv_tokens, settings.max_request_kv_share, settings.schema_limits)
    return ServerState.around(settings, loaded, axis, metrics, engine)


def load_state(settings: Settings, axis_path: Path) -> ServerState:
    """The backend the settings name, with its model and this axis (a missing file fails before any load)."""
    if not axis_path.is_file():
        raise AxisFileError(axis_path, "no such file")
    if settings.backend == "vllm":
        return build_vllm_state(settings, axis_path)
    reserve_threads_for_engine()
    loaded = load_model(settings.model, settings.device, settings.dtype, settings.cache_dir,
                        settings.served_model_name)
    axis = load_axis(axis_path, loaded.n_layers, loaded.model.config.get_text_config().hidden_size)
    return build_state(settings, loaded, axis)


def build_vllm_state(settings: Settings, axis_path: str | Path) -> ServerState:
    """The vLLM backend: checks the axis against the model's config, then starts vLLM (minutes)."""
    if settings.capping_policy == "gated":
        raise RuntimeError("--capping-policy gated runs on the transformers backend only (the vLLM workers cap "
                           "by each request's switch, not by its projections): use another policy")
    vllm = engine_module()

    source, name = model_source(settings.model, settings.cache_dir)
    config = AutoConfig.from_pretrained(source).get_text_config()
    axis = load_axis(axis_path, config.num_hidden_layers, config.hidden_size)
    name = settings.served_model_name or name
    metrics = _metrics(settings, axis, name)
    options = vllm.VllmOptions(settings.tensor_parallel_size, settings.pipeline_parallel_size,
                          settings.gpu_memory_utilization, settings.max_model_len, settings.max_num_seqs, settings.dtype,
                          settings.distributed_executor_backend)
    engine = vllm.VllmEngine(source, name, axis, metrics, options, settings.max_waiting, settings.max_request_kv_share,
                             schema_limits=settings.schema_limits)
    return ServerState.around(settings, engine.model, axis, metrics, engine)
