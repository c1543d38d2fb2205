"""The slot KV store against the model's own attention, on the families the engine serves."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from axiscap.server.engines.hf.kv_slots import PrefillStore, SlotStore, check_supported, slot_attention_for, slot_capacity

from .conftest import tiny_model

CPU = torch.device("cpu")


@dataclass(eq=False)
class Row:
    capacity: int
    tokens: list[int] = field(default_factory=list)
    slot: int = -1
    length: int = 0


def test_slot_capacity_ladder():
    assert [slot_capacity(n) for n in (1, 64, 65, 96, 97, 129, 200, 1000, 1100)] == \
        [64, 64, 96, 96, 128, 192, 256, 1024, 1536]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
@torch.inference_mode()
def test_prefill_then_decode_in_slots_gives_the_models_own_logits(family):
    """Rows of three size classes, prefilled together in slices, then decoded one token at a time
    while rows leave (their class's last slot moves into the hole) and memory is given back.
    Gemma 2's sliding window (16) is shorter than the rows, so per-row windows are exercised."""
    model = tiny_model(family)
    torch.manual_seed(1)
    lengths, prefilled = (110, 70, 9, 40, 25), (30, 50, 3, 24, 20)
    rows = [Row(slot_capacity(n), torch.randint(0, 97, (n,)).tolist()) for n in lengths]
    assert len({row.capacity for row in rows}) == 3
    reference = {id(row): model(input_ids=torch.tensor([row.tokens])).logits[0] for row in rows}

    width = max(prefilled)
    ids = torch.tensor([row.tokens[:p] + [0] * (width - p) for row, p in zip(rows, prefilled)])
    group, store = PrefillStore(width), SlotStore()
    worst = 0.0
    with slot_attention_for(model):
        for start in range(0, width, 16):
            end = min(width, start + 16)
            group.begin(start, end, CPU)
            out = model(input_ids=ids[:, start:end], position_ids=torch.arange(start, end).expand(len(rows), -1),
                        past_key_values=group, kv_store=group, use_cache=True)
            for i, (row, p) in enumerate(zip(rows, prefilled)):
                if start < p <= end:  # this row's last prompt token is in the slice
                    worst = max(worst, (out.logits[i, p - 1 - start] - reference[id(row)][p - 1]).abs().max().item())
        for i, (row, p) in enumerate(zip(rows, prefilled)):
            row.length = p
            store.add(row, group, i)
        assert store.allocated_tokens() == 64 * 2 + 96 * 1 + 128 * 2  # slots double: 1, 2 (and 2 for 128)
        while store.classes:
            batch = store.rows_in_order()
            positions = torch.tensor([row.length for row in batch])
            store.begin_decode(positions)
            out = model(input_ids=torch.tensor([[row.tokens[row.length]] for row in batch]),
                        position_ids=positions[:, None], past_key_values=store, kv_store=store, use_cache=True)
            for row, logits in zip(batch, out.logits[:, -1]):
                worst = max(worst, (logits - reference[id(row)][row.length]).abs().max().item())
                row.length += 1
            for row in batch:
                if row.length == len(row.tokens):
                    store.remove(row)
    assert worst < 1e-4
    assert store.allocated_tokens() == 0
    assert model.config._attn_implementation != "axiscap_slots"  # restored after the block


def test_admission_arithmetic_and_compaction():
    store = SlotStore()
    rows = [Row(64) for _ in range(5)]
    assert store.tokens_after_adding([64] * 5) == 64 * 8
    kv = torch.zeros(1, 2, 4, 8)
    source = PrefillStore(4)
    source.begin(0, 4, CPU)
    source.update(kv, kv, 0)
    for row in rows:
        row.length = 4
        store.add(row, source, 0)
    assert store.allocated_tokens() == 64 * 8
    assert store.tokens_after_adding([64, 64, 64, 96]) == 64 * 8 + 96
    assert store.tokens_after_adding([64] * 4) == 64 * 16
    for row in rows[:3]:
        store.remove(row)
    assert [r.slot for r in store.rows_in_order()] == [0, 1]
    assert store.compact() and store.allocated_tokens() == 64 * 2
    assert not store.compact()


def test_a_model_without_the_attention_interface_is_refused_with_its_name():
    model = tiny_model("llama")
    check_supported(model)
    type(model)._supports_attention_backend = False
    try:
        with pytest.raises(ValueError, match="LlamaForCausalLM does not route its attention"):
            check_supported(model)
    finally:
        del type(model)._supports_attention_backend
    check_supported(model)
