"""Additive steering along the axis, ``h <- h + shift_l * v_l`` at each listed layer's output, every
position: the paper's test that the axis is causal (pushed along it, does the model say something
else?). An experiment's tool, not a serving feature; the server only caps.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from .axis import AssistantAxis
from .hooks import _hidden, _replace_hidden, decoder_layers


@contextmanager
def steered(model: nn.Module, axis: AssistantAxis, shifts: dict[int, float]):
    """Add ``shifts[l]`` times the unit axis of layer ``l`` to that decoder layer's output in every
    forward inside the block, whoever runs it (an engine's thread included); a zero shift adds no hook."""
    layers = decoder_layers(model)
    handles = []

    def add(vector):
        def hook(module, args, output):
            return _replace_hidden(output, _hidden(output) + vector)

        return hook

    try:
        for layer, shift in shifts.items():
            if shift:
                param = next(layers[layer].parameters())
                vector = (axis.unit(layer) * shift).to(param.device, param.dtype)
                handles.append(layers[layer].register_forward_hook(add(vector)))
        yield
    finally:
        for handle in handles:
            handle.remove()
