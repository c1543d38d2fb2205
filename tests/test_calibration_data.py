"""The calibration corpus: ordinary Assistant work, split once, and apart from every check set."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from axiscap.axes.calibration_data import calibration_prompts
from axiscap.axes.persona_data import questions

REPO = Path(__file__).resolve().parent.parent


def strings(value) -> list[str]:
    """Every string inside a JSON document."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def normal(text: str) -> str:
    return " ".join(text.lower().split())


def test_the_corpus_covers_every_kind_of_work_in_both_splits():
    items = calibration_prompts()
    assert len(items) >= 300
    assert len({i.id for i in items}) == len(items)
    counts = Counter((i.category, i.split) for i in items)
    categories = {i.category for i in items}
    assert categories == {"coding", "maths", "facts", "writing", "advice", "summaries", "how-to", "multi-turn"}
    for category in categories:
        assert counts[(category, "train")] >= 15 and counts[(category, "validation")] >= 5, category
    assert len(calibration_prompts("train")) + len(calibration_prompts("validation")) == len(items)
    with pytest.raises(ValueError, match="split must be one of"):
        calibration_prompts("test")


def test_every_item_is_a_conversation_the_model_answers_next():
    for item in calibration_prompts():
        roles = [m["role"] for m in item.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"], item.id
        assert all(m["content"].strip() for m in item.messages), item.id


def test_no_prompt_is_shared_between_splits_or_with_the_axis_data_or_the_evals():
    train = {normal(m["content"]) for i in calibration_prompts("train") for m in i.messages}
    validation = {normal(m["content"]) for i in calibration_prompts("validation") for m in i.messages}
    assert not train & validation
    elsewhere = {normal(q) for q in questions()}
    for path in (REPO / "evals" / "data").glob("*.json"):
        elsewhere |= {normal(s) for s in strings(json.loads(path.read_text()))}
    assert not (train | validation) & elsewhere
