"""Answers checked by code, not by a judge: does capping cost accuracy? (the paper measured IFEval,
MMLU-Pro, GSM8k and EQ-Bench and found none lost at its operating point).

``data/accuracy.json`` (written for axiscap) holds three kinds of item:

  instructions  IFEval-style verifiable instructions; an answer passes when every one of its
                instructions passes IFEval's own checker (``if_verifiable``'s copy of Google's
                registry, strict: the answer as given, no loose variants)
  arithmetic    the key is a whole number; the answer's last number must equal it (GSM8k's rule)
  facts         accepted answers; one must appear in the answer as whole words, case aside

Byte-identical greedy text (the capability suite) penalises harmless rewording; these ask only
whether the answer is right.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class AccuracyItem:
    id: str
    kind: str  # instructions, arithmetic or facts
    prompt: str
    key: tuple  # instructions: (id, kwargs) pairs; arithmetic: (number,); facts: accepted answers


def _instruction_checker(instruction_id: str, kwargs: dict):
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    checker = INSTRUCTION_DICT[instruction_id](instruction_id)
    checker.build_description(**kwargs)
    return checker


def last_number(text: str) -> float | None:
    numbers = _NUMBER.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def passes(item: AccuracyItem, answer: str) -> bool:
    if item.kind == "instructions":
        return bool(answer.strip()) and all(_instruction_checker(i, dict(kw)).check_following(answer)
                                            for i, kw in item.key)
    if item.kind == "arithmetic":
        return last_number(answer) == item.key[0]
    if item.kind == "facts":
        return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", answer, re.I) for a in item.key)
    raise ValueError(f"no checker for accuracy items of kind {item.kind!r}")
