"""Server settings, the one place each ``serve`` flag is defined.

A setting comes from its CLI flag, else its ``AXISCAP_*`` environment variable, else its default.
``add_arguments`` generates the ``serve`` flags from the fields below: name, type, choices, help and
default are written once, here. pydantic-settings' own CLI source was not used because it has no
argument groups and would rename the repeatable ``--api-key``.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .engines.grammar import VLLM_MAX_DEPTH, SchemaLimits

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"

# Argument groups of ``axiscap serve --help``, in order; a field names its group in json_schema_extra.
GROUPS = {
    "limits": ("memory and limits", None),
    "vllm": ("vLLM backend",
             "With --backend vllm (pip install 'axiscap[vllm]'), vLLM runs the model: paged KV cache, CUDA graphs, "
             "tensor and pipeline parallelism; capping runs inside its workers. These flags and "
             "--gpu-memory-utilization, --max-model-len go to vLLM under vLLM's own names."),
    "policy": ("operator policy",
               "What clients may do. A server in front of untrusted clients should set API keys, "
               "--capping-policy always and --no-allow-projections (the deploy/ files do)."),
}


def _only(backend: str, group: str | None = None) -> dict:
    """Metadata of a setting that only one backend reads: set under the other, start-up refuses it."""
    return {"backend": backend, **({"group": group} if group else {})}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AXISCAP_", protected_namespaces=())

    model: str = Field(DEFAULT_MODEL_NAME, description="Hugging Face id or local path (default: the embedded "
                                                       f"{DEFAULT_MODEL_NAME})")
    axis: Path | None = Field(None, description="axis file (default: the shipped axis of the embedded model)")
    served_model_name: str | None = Field(None, description="name clients put in 'model' (default: derived from "
                                                            "--model)")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, description="port")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers: the built-in engine, for CPU and the embedded model; vllm: "
                                    "vLLM's engine, for GPUs and large models")
    device: str = Field("auto", json_schema_extra=_only("transformers"),
                        description="cpu, cuda, cuda:N, balanced (a model too large for one GPU, its layers split "
                                    "over all visible GPUs) or auto")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and activations (default: bfloat16 on CUDA, float32 on CPU)")
    capping_default: bool = Field(True, description="cap requests that do not set 'capping'")
    max_batch_size: int = Field(16, ge=1, json_schema_extra=_only("transformers"),
                                description="requests decoded together")
    max_waiting: int = Field(64, ge=0, description="queued requests beyond the batch before 429")
    prefill_chunk_tokens: int = Field(512, ge=1, json_schema_extra=_only("transformers"),
                                      description="prompt tokens prefilled between two decode steps, so long "
                                                  "prompts do not stall running streams")
    default_max_tokens: int = Field(1024, ge=1, description="completion budget when a request sets none")
    max_n: int = Field(8, ge=1, description="choices one request may ask for with 'n'")
    max_prompt_logprobs_tokens: int = Field(
        4096, ge=1, description="n x prompt tokens a completions request with echo and logprobs may ask logprobs "
                                "for; each costs the output head over the whole vocabulary")
    tool_call_parser: Literal["hermes", "llama3_json"] = Field(
        "hermes", description="how tool calls are found in output under tool_choice auto, as vLLM's flag: hermes "
                              "(<tool_call> JSON; Hermes, Qwen 2/3, and models whose template has no tool syntax, "
                              "which are told the hermes form) or llama3_json (Llama 3.x)")
    cache_dir: Path = Field(Path.home() / ".cache" / "axiscap",
                            description="where the de-quantized default model is kept (default ~/.cache/axiscap)")
    log_level: str = Field("info", description="debug, info, warning")

    # Memory: how much context one request and all requests together may hold.
    max_model_len: int | None = Field(None, ge=2, json_schema_extra={"group": "limits"},
                                      description="prompt + completion tokens one request may use (default: the "
                                                  "model's context window)")
    kv_cache_tokens: int | None = Field(None, ge=2, json_schema_extra=_only("transformers", "limits"),
                                        description="KV cache tokens for all running requests together; requests "
                                                    "wait for room, and one that can never fit gets 400 (default: "
                                                    "from free GPU memory, 65536 on CPU)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, json_schema_extra={"group": "limits"},
                                          description="share of the GPU memory free after loading that the KV "
                                                      "cache may take")
    max_request_kv_share: float = Field(
        0.5, gt=0, le=1, json_schema_extra={"group": "limits"},
        description="share of the KV cache one request (all its n choices, prompt + max_tokens) may reserve; a "
                    "larger one gets 400, so one client cannot hold every other")
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, json_schema_extra={"group": "limits"},
                                description="larger request bodies get 413")
    read_timeout: float = Field(30.0, gt=0, json_schema_extra={"group": "limits"},
                                description="seconds a client has to send a request's headers, and again its body; "
                                            "then it gets 408 and its connection closes, so slow senders cannot "
                                            "hold connections")
    request_timeout: float = Field(600.0, gt=0, json_schema_extra={"group": "limits"},
                                   description="seconds a request may take, queueing included; then it ends with a "
                                               "timeout error")
    # Structured output (response_format, forced tool calls): what one JSON schema may cost to compile.
    max_schema_bytes: int = Field(SchemaLimits.max_bytes, ge=16, json_schema_extra={"group": "limits"},
                                  description="larger JSON schemas get 400")
    max_schema_enum_values: int = Field(SchemaLimits.max_enum_values, ge=0, json_schema_extra={"group": "limits"},
                                        description="enum members and consts one JSON schema may list (a compile's "
                                                    "cost grows with them); more get 400")
    max_schema_depth: int = Field(SchemaLimits.max_depth, ge=1, le=VLLM_MAX_DEPTH,
                                  json_schema_extra={"group": "limits"},
                                  description=f"objects and arrays a JSON schema may nest (at most vLLM's "
                                              f"{VLLM_MAX_DEPTH}); deeper gets 400")
    grammar_compile_timeout: float = Field(SchemaLimits.compile_timeout, gt=0, json_schema_extra={"group": "limits"},
                                           description="CPU seconds one JSON schema's compile may take (in a worker "
                                                       "process, stopped after ten times as long on the clock); "
                                                       "a slower one is stopped and its request gets 400")
    grammar_compile_workers: int = Field(SchemaLimits.compile_workers, ge=1, json_schema_extra={"group": "limits"},
                                         description="processes compiling JSON schemas; more compiles wait for one, "
                                                     "so they never take every core")

    # The vLLM backend's own settings, under vLLM's names.
    tensor_parallel_size: int = Field(1, ge=1, json_schema_extra=_only("vllm", "vllm"),
                                      description="GPUs each layer is split over")
    pipeline_parallel_size: int = Field(1, ge=1, json_schema_extra=_only("vllm", "vllm"),
                                        description="stages the layers are split into, on one or several nodes")
    max_num_seqs: int | None = Field(None, ge=1, json_schema_extra=_only("vllm", "vllm"),
                                     description="requests in vLLM's running batch (default: vLLM's)")
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None, json_schema_extra=_only("vllm", "vllm"),
        description="how vLLM starts its workers (default: vLLM's choice); ray for several nodes, which also opens "
                    "the projection reports socket beyond loopback (its messages stay signed)")

    # Operator policy: what clients may do. The deploy/ files set the safe values.
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, json_schema_extra={"group": "policy", "flag": "--api-key", "metavar": "KEY"},
        description="accept this Bearer key; repeat for several (env AXISCAP_API_KEYS, comma-separated). Without "
                    "any, the API is open")
    protect_health: bool = Field(False, json_schema_extra={"group": "policy"},
                                 description="require a key for /health too (probes then need one)")
    metrics_key: str | None = Field(
        None, json_schema_extra={"group": "policy", "metavar": "KEY"},
        description="the scrape credential: /metrics then answers only 'Authorization: Bearer KEY' (client keys do "
                    "not open it); give Prometheus the same value. Under --no-allow-projections, the per-token "
                    "persona series are exported only with it")
    protect_metrics: bool = Field(False, json_schema_extra={"group": "policy"},
                                  description="refuse to start without --metrics-key, so /metrics is never left open")
    capping_policy: Literal["client", "always", "never", "gated"] = Field(
        "client", json_schema_extra={"group": "policy"},
        description="client: a request's 'capping' field (true, false, or \"auto\" for gated) decides, else "
                    "--capping-default; always / never / gated: the server decides, and a response whose request "
                    "asked otherwise says 'capping_overridden': true. Gated (experimental; transformers backend): "
                    "uncapped until the prompt's system or assistant messages or the answer's token detector show "
                    "drift")
    drift_action: Literal["cap", "flag", "stop"] = Field(
        "cap", json_schema_extra={"group": "policy"},
        description="what a gated request's trip does: cap it from there on; flag it (uncapped, its response and "
                    "a log line with its request id say where it tripped); or stop it there with finish_reason "
                    "'content_filter'. Every trip is counted in axiscap_drift_detections_total")
    allow_projections: bool = Field(True, json_schema_extra={"group": "policy"},
                                    description="let clients ask for per-token axis projections with "
                                                "'return_projections' (off answers such requests 403: projections "
                                                "help tune jailbreaks)")
    playground: bool = Field(True, json_schema_extra={"group": "policy"},
                             description="serve /playground, a page that streams capped and uncapped answers side "
                                         "by side through the public API (it holds no secrets: visitors need a key)")

    @model_validator(mode="after")
    def _metrics_key_given(self):
        if self.protect_metrics and not self.metrics_key:
            raise ValueError("--protect-metrics needs --metrics-key (AXISCAP_METRICS_KEY): /metrics takes a scrape "
                             "credential of its own, not a client's API key")
        return self

    @model_validator(mode="after")
    def _only_settings_the_backend_reads(self):
        fields = type(self).model_fields
        ignored = [name for name in sorted(self.model_fields_set)
                   if (fields[name].json_schema_extra or {}).get("backend") not in (None, self.backend)]
        if ignored:
            flags = ", ".join(f"--{n.replace('_', '-')} (AXISCAP_{n.upper()})" for n in ignored)
            raise ValueError(f"the {self.backend} backend does not read {flags}; unset it, or choose the backend "
                             "that does")
        return self

    @property
    def persona_metrics(self) -> bool:
        """Whether /metrics may carry per-token persona series (projection histogram, tokens below tau,
        cap activations). Around its own request a client could read its projections back from them,
        so they are exported only where clients may have projections anyway, or where only the scrape
        credential opens /metrics."""
        return self.allow_projections or bool(self.metrics_key)

    @property
    def schema_limits(self) -> SchemaLimits:
        return SchemaLimits(max_bytes=self.max_schema_bytes, max_enum_values=self.max_schema_enum_values,
                            max_depth=self.max_schema_depth, compile_timeout=self.grammar_compile_timeout,
                            compile_workers=self.grammar_compile_workers)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v):
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field. Every flag defaults to None ("not given"), so an unset flag leaves
    the environment variable or the field's default in force; ``cli_overrides`` collects the given ones."""
    groups = {key: parser.add_argument_group(title, description) for key, (title, description) in GROUPS.items()}
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra or {}
        target = groups[extra["group"]] if "group" in extra else parser
        flag = extra.get("flag", "--" + name.replace("_", "-"))
        kind = _flag_type(field.annotation)
        options: dict = {"dest": name, "default": None, "help": _help(field)}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:
            options |= {"action": "append", "metavar": extra.get("metavar")}
        elif typing.get_origin(kind) is Literal:
            options["choices"] = list(typing.get_args(kind))
        else:
            options |= {"type": kind, "metavar": extra.get("metavar")}
        target.add_argument(flag, **options)


def cli_overrides(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}


def _flag_type(annotation):
    """The type a flag parses: ``X | None`` is X; ``Annotated[X, ...]`` is X."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _help(field) -> str:
    text = field.description or ""
    extra = field.json_schema_extra or {}
    if "backend" in extra and extra.get("group") != extra["backend"]:
        text = f"{extra['backend']} backend only: {text}"
    if "(default" in text or field.default is None or field.default_factory is not None:
        return text
    default = {True: "on", False: "off"}.get(field.default, field.default) if isinstance(field.default, bool) \
        else field.default
    return f"{text} (default {default})"
