"""Per-request KV cache: each running request keeps its keys and values in a slot of its own.

A padded batch holds every row at the longest row's width and re-copies the whole cache whenever
a request joins or leaves. Here running requests are grouped into size classes by what they may
come to hold (prompt + max_tokens, rounded up a ladder of capacities at most 1.5x apart); each
class has one buffer per layer, ``[slots, kv_heads, capacity, head_dim]``, and a request's token
at position p sits in column p of its own slot. So:

- a decode step writes each row's new key and value at that row's own column (no append copy);
- a request joins by copying only its own prefilled KV into a free slot of its class;
- a request leaves by moving its class's last slot into the hole (one request's copy);
- a short request never pays for a long one's width: each class is as wide as its capacity.

A class grows by doubling its slot count (one copy of that class) and gives memory back when it
empties or when admission needs the room (``compact``).

Attention reads the class buffers in place through ``slot_attention``, registered with
transformers' AttentionInterface: one attention call per class per layer, with masks built once
per forward from each row's own position, so sliding-window layers (Gemma 2) see per-row windows.
Dense per-class buffers rather than pages because on CPU, gathering pages into a dense tensor at
every layer costs as much as the append copy this replaces (measured with SmolLM2, batch 8: +11%
of a step at 300 tokens, +31% at 1,000); paged attention kernels are the vLLM backend's business.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

SLOT_ATTENTION = "axiscap_slots"
_SMALLEST_CAPACITY = 64


def slot_capacity(tokens: int) -> int:
    """The smallest capacity on the ladder 64, 96, 128, 192, 256, 384, ... that holds ``tokens``."""
    capacity = _SMALLEST_CAPACITY
    while True:
        if tokens <= capacity:
            return capacity
        if tokens <= capacity * 3 // 2:
            return capacity * 3 // 2
        capacity *= 2


def check_supported(model: torch.nn.Module) -> None:
    """Slot attention needs a model that dispatches attention through transformers' AttentionInterface
    (Llama, Qwen2/3, Gemma 2, Mistral, ... do); any other would attend to the newest token alone."""
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"{type(model).__name__} does not route its attention through transformers' "
                         "AttentionInterface, which axiscap's engine needs for its per-request KV slots")


@contextmanager
def slot_attention_for(model: torch.nn.Module):
    """Route the model's attention through ``slot_attention`` for the forwards inside the block.

    Only the engine's own forwards use slots; anything else that runs the same model (the axis
    builder's activation pass) keeps the model's own attention and masks.
    """
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = SLOT_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                   softcap=None, kv_store=None, **kwargs):
    """transformers attention function: ``key``/``value`` were already written by the store's ``update``."""
    if kv_store is None:
        raise RuntimeError("slot attention runs only inside the engine's forwards (pass kv_store=...)")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks are not supported by axiscap's slot attention")
    out = kv_store.attend(module.layer_idx, query, scaling, sliding_window, softcap)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SLOT_ATTENTION, slot_attention)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scaling: float | None,
            softcap: float | None) -> torch.Tensor:
    """q [b, heads, q, d] over k, v [b, kv_heads, kv, d]; ``allowed`` [b or 1, 1, q, kv] bool."""
    b, heads, n_q, d = q.shape
    n_rep = heads // k.shape[1]
    if softcap is None and n_q == 1 and n_rep > 1:
        # One query per row: fold the query heads that share a KV head into the query axis, so
        # the KV is read as is (no repeat copy); heads h = g * n_rep + r share KV head g.
        out = F.scaled_dot_product_attention(q.view(b, heads // n_rep, n_rep, d), k, v, attn_mask=allowed,
                                             scale=scaling)
        return out.reshape(b, heads, 1, d)
    if n_rep > 1:
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling)
    # Gemma 2 squashes the logits with tanh before the softmax, which SDPA cannot do.
    scores = (q @ k.transpose(-1, -2)) * (scaling if scaling is not None else d ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def _allowed(query_positions: torch.Tensor, width: int, window: int | None) -> torch.Tensor:
    """[rows, 1, q, width] bool: column c is visible from position p when c <= p (and p - c < window)."""
    columns = torch.arange(width, device=query_positions.device)
    p = query_positions[:, None, :, None]
    allowed = columns <= p
    if window is not None:
        allowed = allowed & (columns > p - window)
    return allowed


class _MaskCache:
    """The masks of one forward, one per sliding window size, built on first use."""

    def __init__(self, query_positions: torch.Tensor, width: int):
        self.query_positions, self.width = query_positions, width
        self._by_window: dict[int | None, torch.Tensor] = {}

    def get(self, window: int | None) -> torch.Tensor:
        if window not in self._by_window:
            self._by_window[window] = _allowed(self.query_positions, self.width, window)
        return self._by_window[window]


class PrefillStore:
    """The KV of a group of prompts being prefilled together, right-padded to the longest one.

    Columns past a row's own length hold padding's keys; no real position ever sees them, and
    only each row's real columns are copied into its slot when the group joins the batch.
    """

    def __init__(self, width: int):
        self.width = width
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self._start = self._end = 0
        self._masks: _MaskCache | None = None

    def begin(self, start: int, end: int, device: torch.device) -> None:
        """The next forward feeds columns [start, end) of every row."""
        self._start, self._end = start, end
        positions = torch.arange(start, end, device=device)[None]
        self._masks = _MaskCache(positions, end)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer: int, *args, **kwargs):
        if layer not in self.keys:
            b, h, _, d = key.shape
            self.keys[layer] = key.new_empty((b, h, self.width, d))
            self.values[layer] = value.new_empty((b, value.shape[1], self.width, value.shape[-1]))
        self.keys[layer][:, :, self._start:self._end] = key
        self.values[layer][:, :, self._start:self._end] = value
        return key, value

    def attend(self, layer: int, query, scaling, window, softcap) -> torch.Tensor:
        k, v = self.keys[layer][:, :, :self._end], self.values[layer][:, :, :self._end]
        return _attend(query, k, v, self._masks.get(window), scaling, softcap)


@dataclass
class _Segment:
    """One class's rows in a decode forward: batch rows [start, start + n) are its slots [0, n)."""

    cls: _SizeClass
    start: int
    n: int
    positions: torch.Tensor  # [n] the column each row writes
    slots: torch.Tensor  # arange(n)
    masks: _MaskCache


class SlotRow(Protocol):
    """What the store needs of a request's row (the engine's rows have these fields)."""

    capacity: int  # KV columns of its size class
    slot: int  # set by the store
    length: int  # columns filled: tokens of this request already in its KV


class _SizeClass:
    """Requests whose reservation fits ``capacity`` columns: one buffer per layer, one slot each."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.slots = 0  # allocated
        self.owners: list[SlotRow] = []  # the row in each used slot, in slot order

    # Zeroed, never empty: attention multiplies the masked columns' values by a zero weight, and a
    # NaN left in fresh memory would turn that product, and the row's output, into NaN.
    def allocate(self, layer: int, like_key: torch.Tensor, like_value: torch.Tensor) -> None:
        h, d = like_key.shape[-3], like_key.shape[-1]
        self.keys[layer] = like_key.new_zeros((self.slots, h, self.capacity, d))
        self.values[layer] = like_value.new_zeros((self.slots, like_value.shape[-3], self.capacity,
                                                   like_value.shape[-1]))

    def resize(self, slots: int) -> None:
        used = len(self.owners)
        for store in (self.keys, self.values):
            for layer, old in store.items():
                new = old.new_zeros((slots, *old.shape[1:]))
                new[:used] = old[:used]
                store[layer] = new
        self.slots = slots


class SlotStore:
    """The running batch's KV: size classes of slots, read and written in place.

    The engine orders its batch by (capacity, slot), so each class is one contiguous run of rows.
    """

    def __init__(self):
        self.classes: dict[int, _SizeClass] = {}
        self._segments: list[_Segment] = []

    # --- membership -------------------------------------------------------------------------

    def add(self, row: SlotRow, source: PrefillStore, index: int) -> None:
        """Give ``row`` a slot and copy its ``row.length`` prefilled columns from row ``index`` of
        ``source``; a prefill runs every layer, so this allocates every layer of a new class."""
        cls = self.classes.get(row.capacity)
        if cls is None:
            cls = self.classes[row.capacity] = _SizeClass(row.capacity)
        if len(cls.owners) == cls.slots:
            cls.resize(max(1, 2 * cls.slots))
        row.slot = len(cls.owners)
        cls.owners.append(row)
        for layer, keys in source.keys.items():
            if layer not in cls.keys:
                cls.allocate(layer, keys, source.values[layer])
            cls.keys[layer][row.slot, :, :row.length] = keys[index, :, :row.length]
            cls.values[layer][row.slot, :, :row.length] = source.values[layer][index, :, :row.length]

    def remove(self, row: SlotRow) -> None:
        """Free ``row``'s slot: the class's last row moves into it, so used slots stay contiguous."""
        cls = self.classes[row.capacity]
        last = cls.owners.pop()
        if last is not row:
            for store in (cls.keys, cls.values):
                for buf in store.values():
                    buf[row.slot, :, :last.length] = buf[last.slot, :, :last.length]
            last.slot = row.slot
            cls.owners[row.slot] = last
        if not cls.owners:  # its memory goes back at once
            del self.classes[row.capacity]

    def rows_in_order(self) -> list[SlotRow]:
        return [row for capacity in sorted(self.classes) for row in self.classes[capacity].owners]

    # --- memory -----------------------------------------------------------------------------

    def allocated_tokens(self) -> int:
        return sum(cls.slots * cls.capacity for cls in self.classes.values())

    def tokens_after_adding(self, capacities: list[int]) -> int:
        """What ``allocated_tokens`` becomes once rows of these capacities join."""
        slots = {c: (len(cls.owners), cls.slots) for c, cls in self.classes.items()}
        for capacity in capacities:
            used, allocated = slots.get(capacity, (0, 0))
            slots[capacity] = (used + 1, allocated if used < allocated else max(1, 2 * allocated))
        return sum(capacity * allocated for capacity, (_, allocated) in slots.items())

    def compact(self) -> bool:
        """Shrink each class to the power of two that holds its rows; True if memory was freed."""
        freed = False
        for cls in self.classes.values():
            slots = 1 << (len(cls.owners) - 1).bit_length()
            if slots < cls.slots:
                cls.resize(slots)
                freed = True
        return freed

    # --- forward passes ---------------------------------------------------------------------

    def begin_decode(self, positions: torch.Tensor) -> None:
        """The next forward feeds one token per row, at ``positions`` [rows] (batch in ``rows_in_order``)."""
        self._segments = []
        start = 0
        for capacity in sorted(self.classes):
            cls = self.classes[capacity]
            n = len(cls.owners)
            width = max(row.length for row in cls.owners) + 1
            pos = positions[start:start + n]
            slots = torch.arange(n, device=pos.device)
            self._segments.append(_Segment(cls, start, n, pos, slots, _MaskCache(pos[:, None], width)))
            start += n

    def update(self, key: torch.Tensor, value: torch.Tensor, layer: int, *args, **kwargs):
        for seg in self._segments:
            rows = slice(seg.start, seg.start + seg.n)
            seg.cls.keys[layer][seg.slots, :, seg.positions] = key[rows, :, 0]
            seg.cls.values[layer][seg.slots, :, seg.positions] = value[rows, :, 0]
        return key, value

    def attend(self, layer: int, query, scaling, window, softcap) -> torch.Tensor:
        outs = []
        for seg in self._segments:
            width = seg.masks.width
            k, v = seg.cls.keys[layer][:seg.n, :, :width], seg.cls.values[layer][:seg.n, :, :width]
            outs.append(_attend(query[seg.start:seg.start + seg.n], k, v, seg.masks.get(window), scaling, softcap))
        return outs[0] if len(outs) == 1 else torch.cat(outs)
