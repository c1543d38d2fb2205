"""The transformers engine's model runner: the running batch on the device, prefill and decode.

Each running request keeps its KV in a slot of its own, in a size class chosen from its reservation
(prompt + max_tokens; see ``kv_slots``). A request joins by copying its own prefilled KV into a slot
and leaves by moving one other request into its hole: the cache is never re-copied as a whole, and
a short request never holds a long one's width. The batch is ordered by (class, slot). A group of
prompts is prefilled together (right-padded, in slices), each row's logits kept at its own last
prompt token, and joins the batch with its first tokens sampled.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from axiscap.steering import AxisHooks

from ..base import LOGPROB_FLOOR, Logprob
from .kv_slots import PrefillStore, SlotStore, slot_attention_for
from .request_state import EngineRequest, Row
from .sampling import BatchSampler, TokenLogprobs

# Prompt positions per prefill step while a group computes prompt logprobs (echo): each position
# runs the vocabulary-wide output head (49k columns on SmolLM2), ~4x a plain prefill's cost per token.
PROMPT_LOGPROBS_SLICE_TOKENS = 128


class PrefillGroup:
    """Requests admitted together, right-padded into one block and prefilled slice by slice."""

    def __init__(self, requests: list[EngineRequest], pad_id: int, device: torch.device):
        contexts = [r.row.context_ids() for r in requests]
        self.width = max(len(c) for c in contexts)
        self.requests = requests
        self.lengths = [len(c) for c in contexts]
        self.ids = torch.tensor([c + [pad_id] * (self.width - len(c)) for c in contexts], device=device)
        real = torch.tensor([[True] * len(c) + [False] * (self.width - len(c)) for c in contexts], device=device)
        starts = [r.row.cap_start() for r in requests]
        self.cap_mask = self.tripped = None
        if any(s is not None for s in starts):
            first = torch.tensor([[self.width if s is None else s] for s in starts], device=device)
            self.cap_mask = (torch.arange(self.width, device=device) >= first) & real
        if any(r.row.capped_by_gate for r in requests):  # re-prefilled after a trip: the gated cap
            self.tripped = torch.tensor([[r.row.capped_by_gate] for r in requests], device=device)
        self.store = PrefillStore(self.width)
        # Each row's logits [rows, vocab] and monitor projection [rows] at its last prompt token.
        self.last_logits: torch.Tensor | None = None
        self.last_projections: torch.Tensor | None = None
        self.done = 0  # columns prefilled so far
        # Rows that asked for their prompt's logprobs and have not had them yet (not a re-prefill); a later
        # choice takes its first choice's, once that one has them (see Engine.submit_all).
        self.prompt_logprob_rows: list[int] = []
        # Rows that asked for their prompt's projections or are gated (not on a re-prefill), and each
        # slice's, on the device.
        self.projection_rows = [i for i, r in enumerate(requests) if r.row.generated == 0 and (
            (r.params.prompt_projections and r.row.prompt_projections is None) or r.row.gate_open)]
        self.projection_slices: list[torch.Tensor] = []
        for i, request in enumerate(requests):
            row = request.row
            if request.params.prompt_logprobs is None or row.generated != 0:
                continue
            if row.prompt_logprobs_from is not None and row.prompt_logprobs_from.row.prefilled:
                row.prompt_logprobs = row.prompt_logprobs_from.row.prompt_logprobs
            else:
                row.prompt_logprobs = [None]
                self.prompt_logprob_rows.append(i)


@dataclass
class StepOutput:
    """What one forward made for the rows it ran, still on the device: the output processor moves it
    to the host in one transfer."""

    rows: list[Row]  # in the order of the tensors' first dimension
    tokens: torch.Tensor  # [rows] sampled
    projections: torch.Tensor | None  # [rows] the monitor layer's projection that made each token; None: no axis
    cap_hits: torch.Tensor | None  # [cap layers] positions capped since the last step's output; None: no axis
    logprobs: TokenLogprobs | None  # for the rows that asked


@dataclass
class Prefilled:
    """A group whose prompts are in: its rows hold slots, and their first tokens are sampled."""

    step: StepOutput | None  # None when no row joins
    recap: list[EngineRequest]  # gated requests whose prompt tripped the gate: to be prefilled again, capped
    stopped: list[EngineRequest]  # gated requests whose prompt tripped the gate under --drift-action stop
    prompt_tokens: int  # prompt tokens prefilled for the first time (a re-prefill is not new prompt work)


def cache_keyword(model) -> str:
    """The forward's name for the KV cache: transformers 5.25 renamed ``past_key_values`` to ``cache``
    (the old name warns on every step and goes in 5.40), while vLLM 0.32 pins one that knows only the old."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class ModelRunner:
    def __init__(self, model, device: torch.device, hooks: AxisHooks | None, pad_id: int, vocab_size: int,
                 eos_ids: set[int], prefill_chunk_tokens: int):
        self.model, self.device, self.hooks = model, device, hooks
        self.pad_id, self.vocab_size, self.eos_ids = pad_id, vocab_size, eos_ids
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self._cache_keyword = cache_keyword(model)
        self.sampler = self.new_sampler()
        self.rows: list[Row] = []  # the running batch, in the store's (class, slot) order
        self.prefilling: PrefillGroup | None = None
        self.store = SlotStore()
        self._next_input: torch.Tensor | None = None  # [batch] long, the tokens the next step feeds
        self._positions: torch.Tensor | None = None  # [batch] long, their positions (= row lengths)
        self._cap_rows: torch.Tensor | None = None  # [batch, 1] bool
        self._tripped_rows: torch.Tensor | None = None  # [batch, 1] bool: capped at the gated thresholds
        self._any_capping = False

    def new_sampler(self) -> BatchSampler:
        return BatchSampler(self.device, self.vocab_size, self.eos_ids)

    def busy_slots(self) -> int:
        group = self.prefilling
        return len(self.rows) + (len(group.requests) if group is not None else 0)

    def begin_group(self, requests: list[EngineRequest]) -> None:
        self.prefilling = PrefillGroup(requests, self.pad_id, self.device)

    def drop_group(self) -> PrefillGroup | None:
        """Give up the group in prefill (it failed, or all of it ended); returns it."""
        group, self.prefilling = self.prefilling, None
        return group

    def prefill_slice(self) -> Prefilled | None:
        """Prefill the next slice of the group's prompts; once they are all in, give the group's rows
        their slots and sample their first tokens.

        Slicing bounds how long running streams wait for a long prompt: one decode step runs
        between two slices of at most ``prefill_chunk_tokens`` tokens. Cap hits of the slices are
        counted in the next step output, whichever step makes it.
        """
        group = self.prefilling
        n, start = len(group.requests), group.done
        budget = self.prefill_chunk_tokens
        if group.prompt_logprob_rows:  # logits at every position: the vocabulary-wide head dominates the step
            budget = min(budget, PROMPT_LOGPROBS_SLICE_TOKENS)
        end = min(group.width, start + max(1, budget // n))
        # Logits only where a row's prompt ends inside this slice (each row at its own column).
        ending = [i for i, length in enumerate(group.lengths) if start < length <= end]
        # Per ending row, the slice column of its last token.
        columns = {i: group.lengths[i] - 1 - start for i in ending}
        # Logits at those columns for every row, a 1-D logits_to_keep: transformers reads per-row (2-D)
        # positions only from 5.2x, and vLLM 0.32 pins it below 5.20.
        kept = sorted(set(columns.values()))
        group.store.begin(start, end, self.device)
        positions = torch.arange(start, end, device=self.device).expand(n, -1)
        every_column = bool(group.prompt_logprob_rows)  # logits at every prompt position (0: keep all)
        mask = group.cap_mask[:, start:end] if group.cap_mask is not None else None
        with self._capping(mask, group.tripped), slot_attention_for(self.model):
            out = self.model(input_ids=group.ids[:, start:end], position_ids=positions, kv_store=group.store,
                             **{self._cache_keyword: group.store}, use_cache=True,
                             logits_to_keep=0 if every_column else (torch.tensor(kept, device=self.device)
                                                                    if ending else 1))
        logits = out.logits
        if group.projection_rows and self.hooks is not None:
            rows = torch.tensor(group.projection_rows, device=self.hooks.monitor_projection.device)
            group.projection_slices.append(self.hooks.monitor_projection.index_select(0, rows))
        if every_column:
            self._prompt_logprobs(group, logits, start, end)
        if ending:
            if group.last_logits is None:
                group.last_logits = logits.new_empty((n, logits.shape[-1]))
                group.last_projections = torch.zeros(n, device=self.device)
            index = torch.tensor(ending, device=self.device)
            at = [columns[i] if every_column else kept.index(columns[i]) for i in ending]
            group.last_logits[index] = logits[index, torch.tensor(at, device=self.device)]
            if self.hooks is not None:
                monitor = self.hooks.monitor_projection
                last = torch.tensor([columns[i] for i in ending], device=monitor.device)
                group.last_projections[index] = monitor[index.to(monitor.device), last].to(self.device)
        group.done = end
        if end < group.width:
            return None
        drifted, stopped = set(), set()  # gated rows whose prompt tripped: to cap (prefilled again), to stop
        if group.projection_slices:  # one host transfer for the whole prompt: prefill work, once per group
            whole = torch.cat(group.projection_slices, dim=1).tolist()
            for i, projections in zip(group.projection_rows, whole):
                row, own = group.requests[i].row, projections[:group.lengths[i]]
                if row.params.prompt_projections and row.prompt_projections is None:
                    row.prompt_projections = own  # as the gate saw them: uncapped
                if row.gate_open and (trip := row.params.gate.prompt_trip(own)) is not None:
                    row.trip = trip
                    if trip.action == "cap":  # capped from the prompt on, as if it had asked: prefilled again
                        row.capping_from = 0
                        drifted.add(i)
                    elif trip.action == "stop":
                        stopped.add(i)
        prompt_tokens = 0
        for request in group.requests:
            if not request.row.prefilled:
                request.row.prefilled = True
                prompt_tokens += len(request.prompt_ids)
        keep = [i for i in range(n) if i not in drifted and i not in stopped]
        rows = [group.requests[i].row for i in keep]
        recap = [group.requests[i] for i in sorted(drifted)]
        ended = [group.requests[i] for i in sorted(stopped)]
        if not rows:
            return Prefilled(None, recap, ended, prompt_tokens)
        self._add_to_store(rows, group, keep)
        try:  # sample only the new rows, with their own parameters
            sampler = self.new_sampler()
            sampler.set_rows(rows)
            index = torch.tensor(keep, device=self.device) if len(keep) < n else None
            logits, projections = group.last_logits, group.last_projections
            if index is not None:
                logits, projections = logits[index], projections[index]
            tokens = sampler.sample(logits)
            return Prefilled(self._step_output(rows, tokens, sampler, projections), recap, ended, prompt_tokens)
        except BaseException:  # the group is retried: its rows give their slots back
            self.release(rows)
            raise

    def join(self, done: Prefilled) -> None:
        """The prefilled group's rows join the running batch (call it under the scheduler's lock)."""
        self.prefilling = None
        if done.step is not None:
            self._reorder(done.step.rows, done.step.tokens)

    def release(self, rows: list[Row]) -> None:
        """Rows of a group that will be retried give their slots back."""
        for row in rows:
            self.store.remove(row)

    def _prompt_logprobs(self, group: PrefillGroup, logits: torch.Tensor, start: int, end: int) -> None:
        """Logprobs of the prompt tokens whose predicting position lies in this slice, for the rows
        that asked (one host transfer per slice: prefill work, not the decode loop)."""
        want = group.prompt_logprob_rows
        rows = [group.requests[i].row for i in want]
        k = max(row.params.prompt_logprobs for row in rows)
        temperature = torch.tensor([row.params.temperature or 1.0 for row in rows], device=logits.device)
        # Column c predicts the token at c + 1: the last column of the whole block predicts nothing.
        stop = min(end, group.width - 1)
        if stop <= start:
            return
        index = torch.tensor(want, device=logits.device)
        logprobs = (logits[index, : stop - start].float() / temperature[:, None, None]).log_softmax(-1)
        targets = group.ids[index, start + 1 : stop + 1].to(logits.device)
        chosen = logprobs.gather(-1, targets.unsqueeze(-1))[..., 0]
        top = logprobs.topk(k, -1)
        host_targets, host_chosen, host_ids, host_values = (
            targets.tolist(), chosen.clamp(min=LOGPROB_FLOOR).tolist(), top.indices.tolist(),
            top.values.clamp(min=LOGPROB_FLOOR).tolist())
        for j, (i, row) in enumerate(zip(want, rows)):
            kept = row.params.prompt_logprobs
            for c in range(min(stop, group.lengths[i] - 1) - start):
                row.prompt_logprobs.append(Logprob(host_targets[j][c], host_chosen[j][c],
                                                   list(zip(host_ids[j][c][:kept], host_values[j][c][:kept]))))

    def decode_step(self) -> StepOutput:
        """One token for every running row."""
        self.store.begin_decode(self._positions)
        with self._capping(self._cap_rows if self._any_capping else None, self._tripped_rows), \
                slot_attention_for(self.model):
            out = self.model(input_ids=self._next_input[:, None], position_ids=self._positions[:, None],
                             **{self._cache_keyword: self.store}, kv_store=self.store, use_cache=True, logits_to_keep=1)
        for row in self.rows:
            row.length += 1
        self._positions = self._positions + 1
        tokens = self.sampler.sample(out.logits[:, -1, :])
        self._next_input = tokens
        return self._step_output(self.rows, tokens, self.sampler)

    def _step_output(self, rows: list[Row], tokens: torch.Tensor, sampler: BatchSampler,
                     projections: torch.Tensor | None = None) -> StepOutput:
        """The step's output; ``projections`` default to the monitor layer's at each row's last position."""
        if self.hooks is None:
            return StepOutput(rows, tokens, None, None, sampler.logprobs)
        if projections is None:
            projections = self.hooks.monitor_projection[:, -1]
        return StepOutput(rows, tokens, projections, self.hooks.take_cap_hits(), sampler.logprobs)

    @contextmanager
    def _capping(self, mask: torch.Tensor | None, tripped: torch.Tensor | None):
        """The hooks cap these rows in the engine's own forward only: a forward someone else runs on the
        same model between steps (an axis tool's teacher forcing) meets no stale mask of another shape."""
        if self.hooks is None:
            yield
            return
        self.hooks.set_cap_mask(mask, tripped)
        try:
            yield
        finally:
            self.hooks.set_cap_mask(None)

    # --- batch bookkeeping ------------------------------------------------------------------

    def _reorder(self, new_rows: list[Row] = (), new_tokens: torch.Tensor | None = None) -> None:
        """Take the batch order from the store after rows joined (with the tokens they feed next)
        or left; the per-row device tensors follow it without leaving the device."""
        old = {id(row): i for i, row in enumerate(self.rows)}
        new = {id(row): len(old) + i for i, row in enumerate(new_rows)}
        self.rows = self.store.rows_in_order()
        if not self.rows:
            self.reset()
            return
        feeding = [t for t in (self._next_input, new_tokens) if t is not None]
        feeding = torch.cat(feeding) if len(feeding) > 1 else feeding[0]
        where = [old[id(row)] if id(row) in old else new[id(row)] for row in self.rows]
        self._next_input = feeding[torch.tensor(where, device=self.device)]
        self._positions = torch.tensor([row.length for row in self.rows], device=self.device)
        self._rows_changed()

    def _add_to_store(self, rows: list[Row], group: PrefillGroup, columns: list[int]) -> None:
        """Give the group's rows (at these rows of its block) their slots, all or none (a failed copy
        leaves no half-joined rows)."""
        added = []
        try:
            for row, i in zip(rows, columns):
                row.length = group.lengths[i]
                self.store.add(row, group.store, i)
                added.append(row)
        except BaseException:
            self.release(added)
            raise

    def remove(self, gone: list[Row]) -> None:
        for row in gone:
            self.store.remove(row)
        self._reorder()

    def _rows_changed(self) -> None:
        self.capping_changed()
        self.sampler.set_rows(self.rows)

    def capping_changed(self) -> None:
        """Take each row's switch from the host (after rows joined or left, or a gate switched one on:
        once per gated request at most, at a step's end, where the host already waited for the step)."""
        self._any_capping = any(row.capping_on for row in self.rows)
        self._cap_rows = (torch.tensor([[row.capping_on] for row in self.rows], device=self.device)
                          if self._any_capping else None)
        self._tripped_rows = (torch.tensor([[row.capped_by_gate] for row in self.rows], device=self.device)
                              if any(row.capped_by_gate for row in self.rows) else None)

    def reset(self) -> None:
        """An empty batch with a fresh store (after the last row left, or after a failed step)."""
        self.rows, self.store = [], SlotStore()
        self._next_input = self._positions = self._cap_rows = self._tripped_rows = None
        self._rows_changed()
