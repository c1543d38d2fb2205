"""The vLLM engine: axiscap's ``EngineClient`` on vLLM's ``AsyncLLM``, with capping in its workers.

vLLM runs as it always does (its V1 engine core in its own process, its workers with paged KV,
torch.compile and CUDA graphs, tensor and pipeline parallelism); axiscap asks it for
``worker.CappingWorker``, hands each request its capping switch in ``SamplingParams.extra_args``,
and joins each generated token with the projection its worker reported over ``transport`` (received
by ``reports``).
Prefix caching is salted by the axis and the switch, so a capped request never reuses KV that
was computed uncapped, or the reverse.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase
from vllm import SamplingParams as VllmSamplingParams
from vllm.config import StructuredOutputsConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs.engine import tokens_input
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.metrics.loggers import StatLoggerBase

from axiscap.steering import AssistantAxis, save_axis

from ..base import (LOGPROB_FLOOR, Delta, GrammarError, Logprob, QueueFull, Request, SamplingParams,
                    StatLogger, StepStats, over_request_share)
from ..grammar import GrammarCompiler, SchemaLimits, vllm_structured_outputs_config
from .reports import ProjectionReports
from .worker import CAPPING_ARG, ID_ARG, PROMPT_ARG, CappingConfig

log = logging.getLogger(__name__)


@dataclass
class VllmOptions:
    """vLLM's own settings, under vLLM's names."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    dtype: str = "auto"
    distributed_executor_backend: str | None = None  # "ray": workers may run on other nodes


@dataclass
class VllmModel:
    """What the HTTP layer needs to know of the served model (``hf.model_loading.LoadedModel``'s shape)."""

    name: str
    tokenizer: PreTrainedTokenizerBase
    vocab_size: int
    context_length: int  # vLLM's max_model_len


class VllmRequest(Request):
    """A request whose cancel() also cancels the asyncio task that drives it in vLLM."""

    task: asyncio.Task | None = None
    timer: asyncio.TimerHandle | None = None  # its --request-timeout

    def cancel(self) -> None:
        super().cancel()
        if self.task is not None:
            self._loop.call_soon_threadsafe(self.task.cancel)


class VllmEngine:
    """``EngineClient`` for vLLM. Construction starts vLLM (minutes: weights, compilation, graphs)."""

    # Its workers build each step's cap mask from the requests' switches; a switch that follows the
    # request's own projections would have to live on the device, in the captured graphs.
    gated_capping = False

    def __init__(self, model_path: str, served_name: str, axis: AssistantAxis, stat_logger: StatLogger,
                 options: VllmOptions, max_waiting: int, max_request_kv_share: float = 1.0, retargetable: bool = False,
                 schema_limits: SchemaLimits = SchemaLimits()):
        self.device_error: str | None = None
        self.retargetable = retargetable
        self.stat_logger, self.max_waiting = stat_logger, max_waiting
        self._running = self._waiting = 0
        self._active: set[VllmRequest] = set()
        self.reports = ProjectionReports(lambda hits: self._record(self._stats(cap_hits=[hits])), axis.cap_layers,
                                other_nodes=options.distributed_executor_backend == "ray")
        if axis.path is None:
            raise ValueError("the vLLM backend needs the axis as a file: its workers load it themselves")
        axis_path = Path(axis.path).resolve()
        axis_sha256 = hashlib.sha256(axis_path.read_bytes()).hexdigest()
        # Keyed by the axis's bytes: a new axis never meets KV cached under the old one.
        self._salt = axis_sha256[:16]
        args = AsyncEngineArgs(
            model=model_path, served_model_name=served_name, dtype=options.dtype,
            tensor_parallel_size=options.tensor_parallel_size,
            pipeline_parallel_size=options.pipeline_parallel_size,
            gpu_memory_utilization=options.gpu_memory_utilization, max_model_len=options.max_model_len,
            max_num_seqs=options.max_num_seqs, enable_prefix_caching=True,
            # Compiles a response format as the built-in engine does (``grammar``), after the same checks.
            structured_outputs_config=StructuredOutputsConfig(**vllm_structured_outputs_config()),
            # The logprobs axiscap reports are after penalties, bias and temperature, on both backends.
            logprobs_mode="processed_logprobs",
            worker_cls=f"{__package__}.worker.CappingWorker",
            distributed_executor_backend=options.distributed_executor_backend,
            additional_config=CappingConfig(str(axis_path), axis_sha256, self.reports.address, self.reports.key,
                                            retargetable),
        )
        engine = self

        class SchedulerGauges(StatLoggerBase):
            """vLLM's scheduler counts, into the same stat logger as everything else."""

            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None:
                    engine._running = scheduler_stats.num_running_reqs
                    engine._waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
                    engine._record()

            def log_engine_initialized(self):
                pass

        config = args.create_engine_config()
        if refused := unsupported_settings(config):
            raise ValueError("the vLLM backend cannot cap under " + "; ".join(refused))
        self.llm = AsyncLLM.from_vllm_config(config, stat_loggers=[SchedulerGauges])
        self.max_num_seqs = config.scheduler_config.max_num_seqs
        # vLLM allocates KV blocks as tokens come, and preempts others when they run out: bound what one
        # request may come to hold, as the built-in engine bounds what it reserves.
        cache = config.cache_config
        self.kv_cache_tokens = (cache.num_gpu_blocks or 0) * cache.block_size
        self.max_request_kv_tokens = int(self.kv_cache_tokens * max_request_kv_share)
        self.model = VllmModel(served_name, AutoTokenizer.from_pretrained(model_path),
                               config.model_config.get_vocab_size(), config.model_config.max_model_len)
        # Checks and compiles each schema under the limits and deadline before vLLM compiles it again
        # in its engine core, where a compile has neither.
        self.grammars = GrammarCompiler(self.model.tokenizer, self.model.vocab_size, schema_limits, stat_logger,
                                        keep_compiled=False)

    # --- EngineClient ---------------------------------------------------------------------

    def start(self) -> None:
        self.reports.start()

    def stop(self) -> None:
        self.reports.stop()
        self.grammars.stop()
        self.llm.shutdown()

    @property
    def healthy(self) -> bool:
        return self.device_error is None and not self.llm.errored

    async def submit_all(self, prompt_ids: list[int], params: list[SamplingParams],
                         timeout: float | None = None) -> list[Request]:
        # All or none: validate every choice first. A schema is compiled in the compile pool, so a large
        # one does not stall the other streams (the choices share one compile).
        for p in params:
            if p.response_format:
                await self.grammars.compile(*p.response_format)
        prepared = [self._vllm_params(p) for p in params]
        needed = sum(len(prompt_ids) + p.max_tokens for p in params)
        if self.kv_cache_tokens and needed > self.max_request_kv_tokens:
            raise over_request_share(len(params), len(prompt_ids), params[0].max_tokens, needed,
                                     self.max_request_kv_tokens, self.kv_cache_tokens)
        # The bound the built-in engine keeps, and axiscap_queue_capacity exports: at most max_waiting
        # requests wait beyond the running batch (running as vLLM's scheduler last reported it).
        waiting = len(self._active) - self._running
        if waiting + len(params) > self.max_waiting + max(0, self.max_num_seqs - self._running):
            raise QueueFull()
        loop = asyncio.get_running_loop()
        requests = []
        for p, (rid, vparams) in zip(params, prepared):
            request = VllmRequest(prompt_ids, p, loop, timeout)
            salt = f"axiscap-{self._salt}-{'capped' if p.capping else 'uncapped'}"
            if p.prompt_projections == "all":  # a salt of its own: no prefix-cache hit skips a prompt token
                salt += f"-{rid}"
            request.task = loop.create_task(self._drive(request, rid, tokens_input(prompt_ids, cache_salt=salt),
                                                        vparams))
            if timeout is not None:  # cancelled when the request ends, so it does not hold the request
                request.timer = loop.call_later(timeout, request.task.cancel)
            self._active.add(request)
            self.reports.open(rid, bool(p.prompt_projections))
            requests.append(request)
        return requests

    async def use_axis(self, axis: AssistantAxis) -> None:
        """Cap and monitor with another axis (its band, tau, vectors and monitor layer) from the next
        request on, without a restart: for an engine started ``retargetable``, with no request running.
        The cap-hit metrics keep the first axis's layers."""
        if not self.retargetable:
            raise RuntimeError("this vLLM engine was not started retargetable: its workers wrap only its axis's layers")
        if self._active:
            raise RuntimeError(f"the axis changes only between requests; {len(self._active)} are running")
        with tempfile.TemporaryDirectory(prefix="axiscap-axis-") as folder:
            path = Path(folder) / "axis.safetensors"  # the workers load it, as they loaded the first one
            save_axis(axis, path)
            await self.llm.collective_rpc("axiscap_use_axis", args=(str(path),))
            self._salt = hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    # --- requests ---------------------------------------------------------------------------

    def _vllm_params(self, p: SamplingParams) -> tuple[str, VllmSamplingParams]:
        structured = None
        if p.response_format is not None:
            kind, schema = p.response_format  # compiled already (submit_all): vLLM's compile will succeed
            structured = (StructuredOutputsParams(json_object=True) if kind == "json_object"
                          else StructuredOutputsParams(json=schema))
        rid = f"axc-{uuid.uuid4().hex}"
        processor = self.llm.input_processor
        # vLLM's own checks (its constructor's, then verify's), here rather than in its engine loop, so a
        # bad value is this request's 400. VLLMValidationError is not a ValueError: caught by name.
        try:
            vparams = VllmSamplingParams(
                n=1, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, seed=p.seed,
                stop=list(p.stop) or None, presence_penalty=p.presence_penalty,
                frequency_penalty=p.frequency_penalty, repetition_penalty=p.repetition_penalty,
                logit_bias=dict(p.logit_bias) or None, min_tokens=p.min_tokens, ignore_eos=p.ignore_eos,
                logprobs=p.logprobs, prompt_logprobs=p.prompt_logprobs, structured_outputs=structured,
                output_kind=RequestOutputKind.DELTA,
                extra_args={CAPPING_ARG: p.capping, ID_ARG: rid, PROMPT_ARG: bool(p.prompt_projections)},
            )
            vparams.clone().verify(processor.model_config, processor.speculative_config,
                                   processor.structured_outputs_config, processor.tokenizer)
        except (ValueError, VLLMClientError) as exc:
            raise (GrammarError if structured is not None else ValueError)(str(exc)) from None
        return rid, vparams

    async def _drive(self, request: VllmRequest, rid: str, prompt, vparams: VllmSamplingParams) -> None:
        prompt_len = len(request.prompt_ids)
        generated, finish = 0, None
        try:
            async for out in self.llm.generate(prompt, vparams, rid):
                completion = out.outputs[0]
                ids = list(completion.token_ids)
                now = time.monotonic()
                stats = self._stats(prompt_tokens=prompt_len if ids and generated == 0 else 0)
                first = generated == 0
                positions = range(prompt_len - 1 + generated, prompt_len - 1 + generated + len(ids))
                projections = await self.reports.take(rid, positions)
                prompt_projections = None
                if first and request.params.prompt_projections:
                    prompt_projections = await self.reports.take_prompt(rid, out.num_cached_tokens or 0, prompt_len)
                generated += len(ids)
                request.record_tokens(stats, projections, now)
                finish = _finish_reason(completion.finish_reason) if out.finished else None
                if finish is not None:
                    request.record_finish(stats, finish, now)
                    # Before the client can see the end, so its next request finds this slot free.
                    self._active.discard(request)
                self._record(stats)
                request.emit(Delta(completion.text, ids, projections, finish,
                                   _logprobs(ids, completion.logprobs, request.params.logprobs),
                                   _prompt_logprobs(out, request) if first else None, prompt_projections))
        except asyncio.CancelledError:  # the client left, or the request ran past its timeout
            finish = request.ended(time.monotonic()) or "timeout"
            self._end(request, finish)
        except EngineDeadError as exc:
            self.device_error = f"the vLLM engine died: {exc}"
            self._end(request, "error")
        except Exception:
            log.exception("request %s failed in vLLM", rid)
            self._end(request, "error")
        finally:
            if request.timer is not None:
                request.timer.cancel()
            self._active.discard(request)
            self.reports.close(rid)

    def _end(self, request: VllmRequest, reason: str) -> None:
        self._active.discard(request)
        stats = self._stats()
        request.record_finish(stats, reason, time.monotonic())
        self._record(stats)
        request.emit(Delta("", [], [], reason))

    def _stats(self, **parts) -> StepStats:
        return StepStats(waiting=self._waiting, running=self._running, **parts)

    def _record(self, stats: StepStats | None = None) -> None:
        self.stat_logger.record(stats or self._stats())


def unsupported_settings(config) -> list[str]:
    """vLLM settings under which the worker's per-token cap mask and projection rows would not follow
    the batch's token layout (each names the setting and why)."""
    parallel, refused = config.parallel_config, []
    if config.speculative_config is not None:
        refused.append("speculative decoding (--speculative-config): several logits rows per request")
    if parallel.data_parallel_size > 1:
        refused.append(f"data parallelism (--data-parallel-size {parallel.data_parallel_size}): "
                       "engine cores the reports do not tell apart")
    if parallel.use_ubatching:
        refused.append("micro-batching (--enable-dbo / --ubatch-size): a step runs in parts the mask does not follow")
    if parallel.prefill_context_parallel_size > 1 or parallel.decode_context_parallel_size > 1:
        refused.append("context parallelism (--prefill-context-parallel-size / --decode-context-parallel-size): "
                       "a request's tokens are split across ranks")
    if config.cache_config.kv_sharing_fast_prefill:
        refused.append("--kv-sharing-fast-prefill: prefill rows are skipped after the shared layers")
    from vllm.platforms import current_platform

    if parallel.distributed_executor_backend == "ray" and not current_platform.ray_device_key:
        # vLLM itself would fail only once Ray is up and its workers are being placed.
        refused.append(f"--distributed-executor-backend ray: vLLM has no Ray support on {current_platform.device_name}")
    return refused


def _finish_reason(reason: str | None) -> str:
    return {"stop": "stop", "length": "length", "abort": "cancelled"}.get(reason or "stop", "error")


def _floor(value: float) -> float:
    return value if math.isfinite(value) else LOGPROB_FLOOR


def _logprob(token_id: int, candidates, k: int) -> Logprob:
    chosen = candidates[token_id]
    top = sorted(((t, c) for t, c in candidates.items() if c.rank is not None and c.rank <= k),
                 key=lambda tc: tc[1].rank)
    return Logprob(token_id, _floor(chosen.logprob), [(t, _floor(c.logprob)) for t, c in top])


def _logprobs(ids: list[int], logprobs, k: int | None) -> list[Logprob] | None:
    if k is None or logprobs is None:
        return None
    return [_logprob(t, logprobs[i], k) for i, t in enumerate(ids)]


def _prompt_logprobs(out, request: Request) -> list[Logprob | None] | None:
    k = request.params.prompt_logprobs
    if k is None or out.prompt_logprobs is None:
        return None
    return [None if c is None else _logprob(t, c, k) for t, c in zip(request.prompt_ids, out.prompt_logprobs)]
