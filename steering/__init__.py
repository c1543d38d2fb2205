"""Axis math with no HTTP: the axis file, capping and monitoring hooks, per-row masks."""

from .axis import AssistantAxis, AxisFileError, load_axis, save_axis
from .hooks import AxisHooks, cap, decoder_layers, record_layer_outputs

__all__ = [
    "AssistantAxis", "AxisFileError", "AxisHooks", "cap", "decoder_layers", "load_axis",
    "record_layer_outputs", "save_axis",
]
