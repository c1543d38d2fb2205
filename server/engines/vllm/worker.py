"""Capping inside vLLM's workers: ``CappingWorker`` is the worker class the vLLM backend asks for.

It is the platform's own worker (CUDA/ROCm or CPU) with two additions, both made once the model
is loaded and before vLLM compiles it and captures CUDA graphs:

- the capped and monitor decoder layers are wrapped in ``steering.split_residual`` caps, whose
  buffers have fixed addresses, so torch.compile traces the capping ops once and CUDA graphs
  replay them (no ``enforce_eager``);
- the model runner's input preparation is followed by one host-to-device copy of the batch's cap
  mask (which tokens belong to a request that asked for capping), and its forward by a gather of
  each request's projection that goes to the front end through ``transport.ReportSender``; for a
  request that asked for its prompt's projections, the same gather takes every prompt token its
  prefill computes (chunk by chunk).

vLLM has two model runners with different batch bookkeeping (V1, used on CPU; V2, the default on
GPUs); ``_BatchLayout`` reads what capping needs from either.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.utils.import_utils import resolve_obj_by_qualname

from axiscap.steering import load_axis
from axiscap.steering.hooks import decoder_layers
from axiscap.steering.split_residual import install_split_residual_caps, retarget_split_residual_caps

from .transport import ReportSender

log = init_logger(f"vllm.{__name__}")  # under "vllm": the worker processes only configure vLLM's loggers

CAPPING_ARG = "axiscap_capping"  # in SamplingParams.extra_args: this request's capping switch
ID_ARG = "axiscap_id"  # in SamplingParams.extra_args: the front end's id for the request
PROMPT_ARG = "axiscap_prompt_projections"  # in SamplingParams.extra_args: report every prompt token
# What the hook reads of Model Runner V2's InputBatch (prepare_inputs' result); tests check 0.32 has them.
V2_BATCH_FIELDS = ("req_ids", "num_scheduled_tokens", "logits_indices", "positions")


@dataclass(frozen=True)
class CappingConfig:
    """What the workers need, handed over as vLLM's ``additional_config``: the axis file, where to send
    reports and the key that signs them.

    vLLM keys its torch.compile cache by ``compute_hash()`` of this object: only what changes the
    compiled graph (the axis file's bytes, hence its capped layers and vectors), never the reports
    address or key, which are new at every start. So a restart reuses the compiled graphs.
    """

    axis: str
    axis_sha256: str
    reports: str
    key: str
    # Every layer wrapped, so that ``CappingWorker.axiscap_use_axis`` can cap another band later
    # (``axiscap axes calibrate --backend vllm``); the server's caps wrap only the axis's layers.
    retargetable: bool = False

    def compute_hash(self) -> str:
        graph = f"axiscap-capping-1:{self.axis_sha256}" + (":retargetable" if self.retargetable else "")
        return hashlib.sha256(graph.encode()).hexdigest()[:32]


def _platform_worker() -> type:
    if current_platform.is_cpu():
        return resolve_obj_by_qualname("vllm.v1.worker.cpu_worker.CPUWorker")
    if current_platform.is_cuda_alike():
        return resolve_obj_by_qualname("vllm.v1.worker.gpu_worker.Worker")
    raise RuntimeError(f"axiscap's vLLM backend runs on CUDA, ROCm and CPU workers, not {current_platform.device_name}")


class CappingWorker(_platform_worker()):
    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        config = self.vllm_config.additional_config
        if isinstance(config, CappingConfig):
            self.batch_capping = BatchCapping(self.model_runner, config, self.vllm_config)

    def axiscap_use_axis(self, path: str) -> None:
        """Cap with the axis file at ``path`` from the next step on (``collective_rpc``; the engine core
        runs it between steps). Only for an engine started with ``CappingConfig.retargetable``."""
        self.batch_capping.use_axis(path)


@dataclass
class _Tracked:
    front_id: str
    capping: bool
    prompt_left: int  # prompt tokens still to report (0: none asked, or all sent)


@dataclass
class _BatchLayout:
    ids: list[str]  # front-end ids, in batch order
    logits_rows: torch.Tensor  # the token row whose logits sample each request's next token
    positions: torch.Tensor  # position of every token row of the batch
    prompt: list[tuple[str, int]]  # (front-end id, rows) of the prompt tokens reported in this step
    prompt_rows: torch.Tensor | None  # their token rows, in that order


class BatchCapping:
    def __init__(self, runner, config: CappingConfig, vllm_config):
        from vllm.distributed import get_tensor_model_parallel_rank

        model = runner.get_model()
        layers = decoder_layers(model)
        inner = next(m for m in model.modules() if getattr(m, "layers", None) is layers)
        # A pipeline stage holds layers [start_layer, end_layer); the rest are placeholders.
        present = range(getattr(inner, "start_layer", 0), getattr(inner, "end_layer", len(layers)))
        axis = load_axis(config.axis, len(layers), vllm_config.model_config.get_hidden_size())
        self.layers, self.hidden_size = layers, vllm_config.model_config.get_hidden_size()
        self.dtype = vllm_config.model_config.dtype
        self.state = install_split_residual_caps(layers, axis, present, runner.max_num_tokens, runner.device, self.dtype,
                                                 config.retargetable)
        self.device = runner.device
        self.pin = self.device.type != "cpu"
        self.requests: dict[str, _Tracked] = {}  # by vLLM's request id
        self.layout: _BatchLayout | None = None
        self.mask_in_use = False
        held = [i for i, l in enumerate(axis.cap_layers) if l in present]
        monitor = axis.monitor_layer in present
        # Tensor-parallel ranks compute the same values: the first one reports.
        self.sender, self.copy_stream = None, None
        if get_tensor_model_parallel_rank() == 0 and (held or monitor):
            self.sender = ReportSender(config.reports, config.key, monitor, [axis.cap_layers[i] for i in held],
                                       self.device)
            # On a GPU the report's device-to-host copy runs on a stream of its own, ordered after the
            # forward by an event, so the next step's kernels do not queue behind it.
            if self.device.type == "cuda":
                self.copy_stream = torch.cuda.Stream(self.device)
        # Where each held capped layer counts its hits in state.hits (retargetable: the layer's own slot).
        self.held_slots = torch.tensor([axis.cap_layers[i] if config.retargetable else i for i in held],
                                       dtype=torch.long, device=self.device)
        self._wrap(runner)
        log.info("axiscap: capping layers %s%s in this worker%s", [axis.cap_layers[i] for i in held],
                 f", monitoring layer {axis.monitor_layer}" if monitor else "",
                 " (retargetable: every layer wrapped)" if config.retargetable else "")

    def use_axis(self, path: str) -> None:
        axis = load_axis(path, len(self.layers), self.hidden_size)
        retarget_split_residual_caps(self.layers, axis, self.dtype)
        self.held_slots = torch.tensor(axis.cap_layers, dtype=torch.long, device=self.device)
        if self.sender is not None:
            self.sender.layers = list(axis.cap_layers)
        log.info("axiscap: now capping layers %s, monitoring layer %d (%s)", axis.cap_layers, axis.monitor_layer, path)

    def _wrap(self, runner) -> None:
        execute = runner.execute_model

        def execute_model(scheduler_output, *args, **kwargs):
            self._track(scheduler_output)
            self.layout = None
            output = execute(scheduler_output, *args, **kwargs)
            if self.layout is not None and self.sender is not None:
                self._report(self.layout)
            return output

        runner.execute_model = execute_model
        if hasattr(runner, "req_states"):  # Model Runner V2
            prepare = runner.prepare_inputs

            def prepare_inputs(*args, **kwargs):
                batch = prepare(*args, **kwargs)
                self._before_forward(*(getattr(batch, field) for field in V2_BATCH_FIELDS))
                return batch

            runner.prepare_inputs = prepare_inputs
        else:  # the V1 runner
            prepare_v1 = runner._prepare_inputs

            def _prepare_inputs(scheduler_output, num_scheduled_tokens, *args, **kwargs):
                result = prepare_v1(scheduler_output, num_scheduled_tokens, *args, **kwargs)
                req_ids = runner.input_batch.req_ids[:len(num_scheduled_tokens)]
                self._before_forward(req_ids, num_scheduled_tokens, result[0], runner.positions)
                return result

            runner._prepare_inputs = _prepare_inputs

    def _track(self, scheduler_output) -> None:
        for new in scheduler_output.scheduled_new_reqs:
            extra = (new.sampling_params.extra_args or {}) if new.sampling_params is not None else {}
            # Prompt tokens a prefix-cache hit skips are never computed; the front end knows how many.
            prompt_left = (len(new.prompt_token_ids or ()) - new.num_computed_tokens) if extra.get(PROMPT_ARG) else 0
            self.requests[new.req_id] = _Tracked(str(extra.get(ID_ARG, new.req_id)), bool(extra.get(CAPPING_ARG)),
                                                 max(prompt_left, 0))
        for req_id in scheduler_output.finished_req_ids:
            self.requests.pop(req_id, None)

    def _before_forward(self, req_ids, num_scheduled_tokens, logits_rows, positions) -> None:
        """Write the batch's cap mask into the persistent buffer the captured graphs read."""
        known = [self.requests.get(r) or _Tracked(r, False, 0) for r in req_ids]
        flags = np.fromiter((t.capping for t in known), dtype=bool, count=len(known))
        counts = np.asarray(num_scheduled_tokens, dtype=np.int64)[:len(known)]
        state = self.state
        state.hits.zero_()
        if flags.any():
            total = int(counts.sum())
            host = torch.tensor(np.repeat(flags, counts), dtype=torch.float32, pin_memory=self.pin)
            state.mask[:total].copy_(host, non_blocking=True)
            state.mask[total:].zero_()  # CUDA-graph padding rows are never capped
            self.mask_in_use = True
        elif self.mask_in_use:
            state.mask.zero_()
            self.mask_in_use = False
        prompt, prompt_rows = self._prompt_rows(known, counts)
        self.layout = _BatchLayout([t.front_id for t in known], logits_rows, positions, prompt, prompt_rows)

    def _prompt_rows(self, known: list[_Tracked], counts: np.ndarray) -> tuple[list[tuple[str, int]], torch.Tensor | None]:
        """The token rows of prompt tokens this step computes for requests that asked for them: a
        request's rows are contiguous, in batch order, and a prefill chunk computes its prompt in order."""
        if not any(t.prompt_left for t in known):
            return [], None
        starts = np.cumsum(counts) - counts
        prompt, ranges = [], []
        for t, start, count in zip(known, starts.tolist(), counts.tolist()):
            if t.prompt_left:
                rows = min(count, t.prompt_left)
                t.prompt_left -= rows
                prompt.append((t.front_id, rows))
                ranges.append(np.arange(start, start + rows))
        host = torch.from_numpy(np.concatenate(ranges))
        return prompt, (host.pin_memory() if self.pin else host).to(self.device, non_blocking=True)

    def _report(self, layout: _BatchLayout) -> None:
        # One logits row per request: axiscap never configures speculative decoding.
        rows = layout.logits_rows.long()
        parts = [layout.positions[rows].double(), self.state.projections[rows].double(),
                 self.state.hits[self.held_slots].double()]
        if layout.prompt_rows is not None and self.sender.monitor:
            parts += [layout.positions[layout.prompt_rows].double(), self.state.projections[layout.prompt_rows].double()]
        packed = torch.cat(parts)
        host = torch.empty(packed.shape, dtype=torch.float64, pin_memory=self.pin)
        ready = None
        if self.copy_stream is not None:
            forward_done = torch.cuda.Event()
            forward_done.record()
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(forward_done)
                packed.record_stream(self.copy_stream)  # not reused by the compute stream before the copy
                host.copy_(packed, non_blocking=True)
                ready = torch.cuda.Event(blocking=True)  # the sender sleeps on it instead of polling
                ready.record(self.copy_stream)
        elif self.device.type != "cpu":  # another accelerator: the compute stream, as vLLM's own copies
            host.copy_(packed, non_blocking=True)
            ready = torch.Event(device=self.device.type)
            ready.record()
        else:
            host.copy_(packed)
        self.sender.put(layout.ids, layout.prompt if self.sender.monitor else [], ready, host)
