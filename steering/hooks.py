"""Forward hooks on transformers' decoder layers that cap (``steering.capping``) and monitor the
residual stream along the Assistant Axis. Everything here stays on the model's device: the hooks
never read a value back to the host, so a decode step costs no extra GPU sync.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .axis import AssistantAxis
from .capping import capping_plan, pull_up, shortfall

# Where common causal-LM families keep their decoder layers.
_LAYER_PATHS = ("model.layers", "model.language_model.layers", "language_model.model.layers",
                "transformer.h", "gpt_neox.layers")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in _LAYER_PATHS:
        node = model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, nn.ModuleList):
            return node
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}; tried {_LAYER_PATHS}")


def _hidden(output):
    # transformers 5.x hands decoder-layer hooks a bare Tensor, 4.x a tuple.
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class AxisHooks:
    """Caps the configured band and records the monitor layer's projection.

    The caller sets, before each forward, which positions may be capped (``set_cap_mask``): a bool
    tensor broadcastable to ``[batch, seq]``, so requests with capping on and off share one pass.
    Positions outside the mask keep exactly the values the model computed (h - 0·v). Rows whose gate
    tripped (``tripped``) are capped at the axis's gated thresholds where it has them.
    """

    def __init__(self, model: nn.Module, axis: AssistantAxis):
        layers = decoder_layers(model)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        axis.validate(len(layers), getattr(model.config, "hidden_size", None))
        self.monitor_layer = axis.monitor_layer
        self.cap_layers = list(axis.cap_layers)
        # A model split across GPUs (device_map) has layers on several devices: each layer's vectors
        # live where that layer runs.
        plan = capping_plan(axis, self.dtype, lambda l: next(layers[l].parameters(), param).device)
        # Per capped layer, how many token positions the cap changed since the last reset.
        self.cap_hits = torch.zeros(len(self.cap_layers), dtype=torch.int64, device=self.device)
        # Projection onto the unit axis at the monitor layer, before that layer's cap: [batch, seq], float32.
        self.monitor_projection: torch.Tensor | None = None
        self._cap_mask: torch.Tensor | None = None
        self._tripped: torch.Tensor | None = None
        self._handles = [layers[l].register_forward_hook(self._make_hook(entry)) for l, entry in plan.items()]

    def set_cap_mask(self, mask: torch.Tensor | None, tripped: torch.Tensor | None = None) -> None:
        """Bool mask broadcastable to [batch, seq] of positions to cap; None caps nothing. ``tripped``
        ([batch, 1] bool, or None for none): the rows capped at the gated thresholds instead."""
        self._cap_mask, self._tripped = mask, tripped

    def take_cap_hits(self) -> torch.Tensor:
        """The counts since the last take, which starts the next count from zero (on the device, no sync)."""
        hits = self.cap_hits.clone()
        self.cap_hits.zero_()
        return hits

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _make_hook(self, entry):
        v, v32, tau, gated_tau, is_monitor = entry.unit, entry.unit32, entry.tau, entry.gated_tau, entry.monitor
        hits = self.cap_hits[entry.slot] if entry.slot is not None else None  # a view: add_ lands in cap_hits

        def hook(module, args, output):
            # Few, fused ops: this runs at every capped layer on every decode step.
            h = _hidden(output)
            proj = h.float() @ v32
            if is_monitor:
                self.monitor_projection = proj
            mask = self._cap_mask
            if tau is None or mask is None:
                return None
            tripped = self._tripped
            row_tau = tau if tripped is None or gated_tau is None else \
                torch.where(tripped.to(h.device, non_blocking=True), gated_tau, tau)
            short = shortfall(proj, row_tau, mask.to(h.device, non_blocking=True))
            hits.add_((short < 0).sum().to(hits.device, non_blocking=True))
            return _replace_hidden(output, pull_up(h, short, v))

        return hook


@contextmanager
def record_layer_outputs(model: nn.Module, layers: list[int] | None = None):
    """Collect each decoder layer's output (the residual stream) during the forwards inside.

    Yields a dict layer -> list of tensors, one per forward, detached and on the model's device.
    """
    modules = decoder_layers(model)
    layers = list(range(len(modules))) if layers is None else layers
    store: dict[int, list[torch.Tensor]] = {l: [] for l in layers}

    def make(l):
        def hook(module, args, output):
            store[l].append(_hidden(output).detach())

        return hook

    handles = [modules[l].register_forward_hook(make(l)) for l in layers]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()
