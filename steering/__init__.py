"""Axis math with no HTTP: the axis file, capping and monitoring hooks, per-row masks."""

from .axis import AssistantAxis, AxisFileError, load_axis, save_axis
from .capping import cap, capping_plan
from .hooks import AxisHooks, decoder_layers, record_layer_outputs

__all__ = [
    "AssistantAxis", "AxisFileError", "AxisHooks", "cap", "capping_plan", "decoder_layers", "load_axis",
    "record_layer_outputs", "save_axis",
]
