"""The running batch's KV cache: rows can join (left-padded), leave, and grow without re-copying.

transformers' DynamicLayer appends a token with ``torch.cat``, copying the whole cache every
decode step (a fifth of a batch-8 CPU step for SmolLM2). Here each layer keeps its keys and values
in a buffer with spare columns on the right; appending writes into them, and the model sees a view
of the filled part. Re-allocation happens only when rows join or leave, or the room runs out.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

_GROWTH = 128  # spare columns added when a buffer runs out of room


class GrowableLayer(DynamicLayer):
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._set(key_states[..., :0, :], value_states[..., :0, :])

    def _set(self, keys: torch.Tensor, values: torch.Tensor, spare: int = _GROWTH) -> None:
        """Hold ``keys``/``values`` [batch, heads, seq, dim] in fresh buffers with ``spare`` free columns."""
        b, h, n, d = keys.shape
        self._kbuf = keys.new_empty((b, h, n + spare, d))
        self._vbuf = values.new_empty((b, values.shape[1], n + spare, values.shape[-1]))
        self._kbuf[:, :, :n] = keys
        self._vbuf[:, :, :n] = values
        self._len = n
        self.keys, self.values = self._kbuf[:, :, :n], self._vbuf[:, :, :n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self._len + n > self._kbuf.shape[-2]:
            self._set(self.keys, self.values, spare=max(n, _GROWTH))
        end = self._len + n
        self._kbuf[:, :, self._len:end] = key_states
        self._vbuf[:, :, self._len:end] = value_states
        self._len = end
        self.keys, self.values = self._kbuf[:, :, :end], self._vbuf[:, :, :end]
        return self.keys, self.values


class BatchCache(Cache):
    """A cache whose rows the engine can reshape between forward passes."""

    def __init__(self):
        super().__init__(layer_class_to_replicate=GrowableLayer)

    @property
    def width(self) -> int:
        return self.get_seq_length()

    def pad_left(self, n: int) -> None:
        """Add ``n`` empty columns before every row (they are masked out)."""
        if n <= 0:
            return
        for layer in self.layers:
            layer._set(left_pad(layer.keys, n), left_pad(layer.values, n))

    def extend_rows(self, other: BatchCache) -> None:
        """Append ``other``'s rows; both must have the same width (pad the narrower one first)."""
        if not self.layers:
            self.layers = other.layers
            return
        for mine, theirs in zip(self.layers, other.layers):
            mine._set(torch.cat([mine.keys, theirs.keys]), torch.cat([mine.values, theirs.values]))

    def keep_rows(self, index: torch.Tensor, drop_left: int) -> None:
        """Keep the rows in ``index`` and drop ``drop_left`` leading columns (padding in every kept row)."""
        for layer in self.layers:
            layer._set(layer.keys[index, :, drop_left:], layer.values[index, :, drop_left:])


def left_pad(t: torch.Tensor, n: int, dim: int = -2) -> torch.Tensor:
    if n <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)
