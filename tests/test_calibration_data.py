"""The calibration corpus: ordinary Assistant work, split once, and apart from every check set."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from axiscap.axes import persona_data
from axiscap.axes.calibration_data import calibration_prompts
from axiscap.axes.persona_data import questions
from axiscap.evals import suites

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


# Words that say what kind of request a prompt is, not what it is about: without them, "What is the
# capital of Japan?" and "What is the capital of Canada?" share one word of three, and a reworded copy
# ("How many bones are in ..." / "How many bones are there in ...") shares them all.
FUNCTION_WORDS = frozenset(
    "a an the is are was were be to of in on at for and or but with what which who whom how why when where do "
    "does did i you your my me can could would should will it its this that these those there their about into "
    "from by as than then so if not no please tell give some any one".split())
PARAPHRASE = 0.6  # content-word Jaccard at or above which two prompts count as one


def content_words(text: str) -> frozenset[str]:
    return frozenset(w for w in re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()) if w not in FUNCTION_WORDS)


def paraphrases(sets: dict[str, list[str]]) -> list[tuple[str, str, str, str]]:
    """Pairs of prompts from different sets whose content words mostly coincide."""
    words = {name: [(t, content_words(t)) for t in texts] for name, texts in sets.items()}
    return [(a, x, b, y) for a, b in itertools.combinations(sets, 2) for x, wx in words[a] for y, wy in words[b]
            if wx and wy and len(wx & wy) / len(wx | wy) >= PARAPHRASE]


def prompt_sets() -> dict[str, list[str]]:
    """Every prompt a build, a calibration, a check or the eval sends, by the set it belongs to."""
    sets = {f"calibration {split}": [m["content"] for i in calibration_prompts(split) for m in i.messages
                                     if m["role"] == "user"] for split in ("train", "validation")}
    sets["persona questions"] = questions()
    sets["check questions"] = persona_data.check_questions()
    sets["eval capability"] = list(suites.capability().prompts)
    sets["eval drift"] = [t for c in suites.drift() for t in c.turns]
    sets["eval jailbreaks"] = [x for j in suites.jailbreaks() for x in (j.harmful, j.benign)]
    sets["eval accuracy"] = [i.prompt for i in suites.accuracy()]
    return sets


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


def test_no_prompt_paraphrases_one_in_another_data_set():
    """Exact matches miss reworded copies: a calibration prompt reworded into an eval item leaks the
    one into the other as surely as a copy does."""
    assert paraphrases(prompt_sets()) == []


def test_the_paraphrase_check_finds_reworded_copies_and_not_shared_templates():
    found = paraphrases({"calibration": ["How many bones are there in the adult human body?",
                                         "Who wrote the play Romeo and Juliet?",
                                         "Explain the difference between a list and a tuple in Python.",
                                         "What is the capital of Canada?"],
                         "eval": ["How many bones are in the adult human body?", "Who wrote 'Romeo and Juliet'?",
                                  "What is the difference between a list and a tuple?", "What is the capital of Japan?"]})
    assert [(x, y) for _, x, _, y in found] == [
        ("How many bones are there in the adult human body?", "How many bones are in the adult human body?"),
        ("Who wrote the play Romeo and Juliet?", "Who wrote 'Romeo and Juliet'?"),
        ("Explain the difference between a list and a tuple in Python.", "What is the difference between a list and a tuple?")]
