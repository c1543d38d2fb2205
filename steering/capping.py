"""The capping formula and the per-layer plan, once, for every kind of hook.

Capping at layer l (Lu et al. 2026): h <- h - v * min(<h, v> - tau_l, 0), v the unit axis, on the
decoder layer's output, for every position. ``steering.hooks`` (transformers layers) and
``steering.split_residual`` (vLLM's layers) both apply it through ``shortfall`` and ``pull_up``.

Projections and their comparison with tau run in float32 whatever the model's dtype: in bfloat16 a
projection of ~50 is only resolved to ~0.25, coarser than many taus' margins. The correction
itself is applied in the model's dtype, with the unit vector in that dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .axis import AssistantAxis


def shortfall(projection: torch.Tensor, tau: torch.Tensor | float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """min(<h, v> - tau, 0) per position, and 0 where ``mask`` is off: how far to pull each one up."""
    below = (projection - tau).clamp(max=0)
    return below if mask is None else below * mask


def pull_up(h: torch.Tensor, short: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """h - v * shortfall. Where the shortfall is 0, h - 0*v keeps h exactly as the model computed it."""
    return torch.addcmul(h, short.unsqueeze(-1).to(h.dtype), unit, value=-1)


def cap(h: torch.Tensor, v: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """The formula on its own, for one unit vector: what every hook computes where capping is on."""
    return pull_up(h, shortfall(h.float() @ v.float(), tau), v.to(h.dtype))


@dataclass(frozen=True)
class LayerCap:
    """What a hook at one watched layer needs, on that layer's device."""

    unit32: torch.Tensor  # the unit axis in float32, for projections
    unit: torch.Tensor  # the same in the model's dtype, for the correction
    tau: torch.Tensor | None  # float32 scalar; None: monitored, not capped
    slot: int | None  # index of this layer's counter among the capped layers
    monitor: bool  # whether this is the monitor layer, whose projections are reported
    gated_tau: torch.Tensor | None = None  # float32 scalar: tau for requests whose gate tripped (None: ``tau``)


def capping_plan(axis: AssistantAxis, dtype: torch.dtype,
                 device_of: Callable[[int], torch.device]) -> dict[int, LayerCap]:
    """One entry per capped or monitored layer. ``device_of(layer)``: where that layer runs (a model
    split across GPUs has layers on several devices)."""
    plan = {}
    gated = dict(zip(axis.cap_layers, axis.gated_cap_thresholds or ()))
    for layer in sorted({*axis.cap_layers, axis.monitor_layer}):
        device, tau = device_of(layer), axis.threshold(layer)
        plan[layer] = LayerCap(
            unit32=axis.unit(layer).to(device, torch.float32),
            unit=axis.unit(layer).to(device, dtype),
            tau=None if tau is None else torch.tensor(tau, device=device, dtype=torch.float32),
            slot=axis.cap_layers.index(layer) if tau is not None else None,
            monitor=layer == axis.monitor_layer,
            gated_tau=torch.tensor(gated[layer], device=device, dtype=torch.float32) if layer in gated else None,
        )
    return plan
