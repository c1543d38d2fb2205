"""Capping for decoder layers that keep the residual stream split in two, as vLLM's do.

vLLM's decoder layers return ``(hidden, residual)`` and the next layer's fused add-and-norm sums
them, so the residual stream the paper caps (the decoder layer's output) is ``hidden + residual``.
``SplitResidualCap`` wraps such a layer, projects that sum onto the unit axis, and takes the
correction off ``residual`` alone: the next layer still sees ``hidden + residual' = h - v·shortfall``.

Everything is tensor ops on persistent buffers (``CapState``), with no Python branching on
values, so torch.compile traces it once and CUDA graphs replay it: the caller writes which token
positions are capped into ``CapState.mask`` before each forward, and reads the monitor layer's
projections and the per-layer cap counts from ``CapState`` after it.
"""

from __future__ import annotations

import torch
from torch import nn

from .axis import AssistantAxis
from .capping import LayerCap, capping_plan, pull_up, shortfall


class CapState(nn.Module):
    """The buffers every capped layer of one model shares; one slot per token of the largest batch."""

    def __init__(self, max_tokens: int, n_capped: int, device: torch.device):
        super().__init__()
        # 1.0 where the token's request asked for capping, 0.0 elsewhere (and on padding).
        self.register_buffer("mask", torch.zeros(max_tokens, device=device), persistent=False)
        # Monitor layer's projection per token, float32, before that layer's cap (as steering.hooks).
        self.register_buffer("projections", torch.zeros(max_tokens, device=device), persistent=False)
        # Positions each capped layer changed, summed over the forwards since the last reset.
        self.register_buffer("hits", torch.zeros(max(n_capped, 1), device=device), persistent=False)


class SplitResidualCap(nn.Module):
    """A decoder layer returning ``(hidden, residual)``, capped and/or monitored at its output."""

    def __init__(self, layer: nn.Module, plan: LayerCap, state: CapState):
        super().__init__()
        self.layer = layer
        self.state = state  # shared by every wrapped layer: one set of buffers per model
        # Buffers, so that torch.compile sees them as the module's state, not as constants.
        self.register_buffer("unit32", plan.unit32, persistent=False)
        self.register_buffer("unit", plan.unit, persistent=False)
        self.register_buffer("tau", plan.tau if plan.tau is not None else plan.unit32.new_zeros(()), persistent=False)
        self.capped, self.slot, self.monitor = plan.tau is not None, plan.slot, plan.monitor

    def forward(self, positions, hidden_states, residual, *args, **kwargs):
        hidden, residual = self.layer(positions, hidden_states, residual, *args, **kwargs)
        n = hidden.shape[0]
        proj = (hidden.float() + residual.float()) @ self.unit32
        if self.monitor:
            self.state.projections[:n].copy_(proj)
        if self.capped:
            short = shortfall(proj, self.tau, self.state.mask[:n])
            self.state.hits[self.slot:self.slot + 1].add_((short < 0).sum())
            residual = pull_up(residual, short, self.unit)
        return hidden, residual


def install_split_residual_caps(layers: nn.ModuleList, axis: AssistantAxis, present: range, max_tokens: int,
                                device: torch.device, dtype: torch.dtype) -> CapState:
    """Wrap, in place, the capped and monitor layers of ``layers`` that this process holds.

    ``present`` is the layers that run here (a pipeline stage holds a slice; the others are
    placeholders). Tensor-parallel ranks each hold the whole hidden state at a layer's output (the
    layer ends in an all-reduce), so every rank computes the same cap with no communication.
    """
    axis.validate(len(layers))
    state = CapState(max_tokens, len(axis.cap_layers), device)
    for layer, plan in capping_plan(axis, dtype, lambda _: device).items():
        if layer in present:
            layers[layer] = SplitResidualCap(layers[layer], plan, state)
    return state
