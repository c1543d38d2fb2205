"""Ordinary Assistant work for calibrating the cap thresholds: ``data/calibration_prompts.json``.

The axis direction comes from persona data (default versus role-play answers to introspective
questions, ``persona_data``); a threshold set from those answers alone lies above a normal coding
or maths answer, so capping would change ordinary work. These prompts are what the model's default
Assistant answers instead: coding, maths, facts, writing, advice, summaries, how-to and multi-turn
help (304 written for axiscap, 40 per single-turn category and 24 conversations). Each item has a
fixed split: ``train`` items set tau, ``validation`` items (every fourth of each category) check
what capping changes, and neither overlaps the axis questions or the eval suites
(``tests/test_calibration_data.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).parent / "data"
SPLITS = ("train", "validation")


@dataclass(frozen=True)
class CalibrationPrompt:
    id: str
    category: str
    split: str
    messages: tuple[dict, ...]  # chat messages ending with the user turn the model answers


def calibration_prompts(split: str | None = None) -> list[CalibrationPrompt]:
    """All items, or one split's."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    items = json.loads((DATA / "calibration_prompts.json").read_text())["items"]
    return [CalibrationPrompt(i["id"], i["category"], i["split"], tuple(i["messages"]))
            for i in items if split is None or i["split"] == split]
