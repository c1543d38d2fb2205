"""Capping for decoder layers that keep the residual stream split in two, as vLLM's do.

vLLM's decoder layers return ``(hidden, residual)`` and the next layer's fused add-and-norm sums
them, so the residual stream the paper caps (the decoder layer's output) is ``hidden + residual``.
``SplitResidualCap`` wraps such a layer, projects that sum onto the unit axis, and takes the
correction off ``residual`` alone: the next layer still sees ``hidden + residual' = h - v·shortfall``.

Everything is tensor ops on persistent buffers (``CapState``), with no Python branching on
values, so torch.compile traces it once and CUDA graphs replay it: the caller writes which token
positions are capped into ``CapState.mask`` before each forward, and reads the monitor layer's
projections and the per-layer cap counts from ``CapState`` after it.

Installed ``retargetable``, every layer is wrapped, and another axis's band, thresholds, vectors and
monitor layer can be copied into the same buffers later (``retarget_split_residual_caps``): a
calibration tries many bands on one running vLLM instead of one start (and compilation) per band.
"""

from __future__ import annotations

import dataclasses
import math

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
    """A decoder layer returning ``(hidden, residual)``, capped and/or monitored at its output.

    Retargetable, it is always capped and monitored in the traced graph, and its buffers say how:
    tau -inf for a cap that never fires, ``watched`` 0.0 for a layer whose projection is not the one
    reported (1.0 for the monitor layer's)."""

    def __init__(self, layer: nn.Module, plan: LayerCap, state: CapState, retargetable: bool = False):
        super().__init__()
        self.layer = layer
        self.state = state  # shared by every wrapped layer: one set of buffers per model
        # Buffers, so that torch.compile sees them as the module's state, not as constants.
        self.register_buffer("unit32", plan.unit32.clone(), persistent=False)
        self.register_buffer("unit", plan.unit.clone(), persistent=False)
        self.register_buffer("tau", plan.tau if plan.tau is not None else plan.unit32.new_zeros(()), persistent=False)
        self.capped, self.slot, self.monitor = plan.tau is not None, plan.slot, plan.monitor
        self.retargetable = retargetable
        if retargetable:
            self.register_buffer("watched", plan.unit32.new_zeros(()), persistent=False)
            self.capped = self.monitor = True
            self.retarget(plan)

    def retarget(self, plan: LayerCap | None) -> None:
        """Take another axis's plan for this layer, in place. None: a layer that axis neither caps
        nor monitors."""
        if plan is not None:
            self.unit32.copy_(plan.unit32)
            self.unit.copy_(plan.unit)
        if plan is None or plan.tau is None:
            self.tau.fill_(-math.inf)
        else:
            self.tau.copy_(plan.tau)
        self.watched.fill_(float(plan is not None and plan.monitor))

    def forward(self, positions, hidden_states, residual, *args, **kwargs):
        hidden, residual = self.layer(positions, hidden_states, residual, *args, **kwargs)
        n = hidden.shape[0]
        proj = (hidden.float() + residual.float()) @ self.unit32
        if self.monitor:
            if self.retargetable:  # exact for a weight of 0 or 1: old*1 + proj*0, old*0 + proj*1
                self.state.projections[:n].mul_(1 - self.watched).add_(proj * self.watched)
            else:
                self.state.projections[:n].copy_(proj)
        if self.capped:
            short = shortfall(proj, self.tau, self.state.mask[:n])
            self.state.hits[self.slot:self.slot + 1].add_((short < 0).sum())
            residual = pull_up(residual, short, self.unit)
        return hidden, residual


def install_split_residual_caps(layers: nn.ModuleList, axis: AssistantAxis, present: range, max_tokens: int,
                                device: torch.device, dtype: torch.dtype, retargetable: bool = False) -> CapState:
    """Wrap, in place, the capped and monitor layers of ``layers`` that this process holds.

    ``present`` is the layers that run here (a pipeline stage holds a slice; the others are
    placeholders). Tensor-parallel ranks each hold the whole hidden state at a layer's output (the
    layer ends in an all-reduce), so every rank computes the same cap with no communication.

    ``retargetable``: every layer is wrapped (all must be present), each counts its cap hits in
    its own slot of ``CapState.hits`` (the layer's index), and ``retarget_split_residual_caps``
    moves the band, tau, vectors and monitor layer later. Costs one projection per layer and token.
    """
    axis.validate(len(layers))
    if retargetable and present != range(len(layers)):
        raise ValueError(f"retargetable caps need every layer in one process, not layers {present.start}-{present.stop - 1}")
    state = CapState(max_tokens, len(layers) if retargetable else len(axis.cap_layers), device)
    plans = capping_plan(axis, dtype, lambda _: device)
    for layer in present:
        plan = plans.get(layer)
        if retargetable:
            unit32 = axis.unit(layer).to(device, torch.float32)
            plan = plan or LayerCap(unit32, unit32.to(dtype), None, None, False)
            layers[layer] = SplitResidualCap(layers[layer], dataclasses.replace(plan, slot=layer), state, retargetable)
        elif plan is not None:
            layers[layer] = SplitResidualCap(layers[layer], plan, state)
    return state


def retarget_split_residual_caps(layers: nn.ModuleList, axis: AssistantAxis, dtype: torch.dtype) -> None:
    """Cap and monitor as ``axis`` says from the next forward on, in the buffers of a retargetable
    install. Call it between forwards."""
    axis.validate(len(layers))
    if not all(isinstance(layer, SplitResidualCap) and layer.retargetable for layer in layers):
        raise RuntimeError("these layers were not installed retargetable")
    plans = capping_plan(axis, dtype, lambda _: layers[0].tau.device)
    for i, layer in enumerate(layers):
        layer.retarget(plans.get(i))
