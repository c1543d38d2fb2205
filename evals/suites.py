"""The evaluation suites, as data files in ``data/`` (the project wrote them; at least 20 items each):

``drift.json``       multi-turn conversations of the kinds the paper reports as drifting (emotional
                     disclosure, pushes to reflect on its own nature, requests for an authorial voice)
                     and of kinds that do not (coding, factual help), 4 turns each; and 12-turn ones in
                     the paper's drift domains (therapy-like disclosure, the model's own nature)
``jailbreak.json``   a persona system prompt that casts the model as an unrestricted character, a
                     request it should decline, and a matched benign request under the same persona
``capability.json``  neutral prompts (answered at temperature 0) and neutral passages (perplexity)
``accuracy.json``    items whose answers code can check: IFEval-style instructions, arithmetic, facts
                     (``accuracy.py``)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .accuracy import AccuracyItem

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Conversation:
    id: str
    kind: str
    drifts: bool  # a kind the paper reports as drifting
    turns: tuple[str, ...]


@dataclass(frozen=True)
class Jailbreak:
    id: str
    persona: str
    description: str
    system: str
    harmful: str
    benign: str


@dataclass(frozen=True)
class Capability:
    prompts: tuple[str, ...]
    passages: tuple[str, ...]


def _load(name: str):
    return json.loads((DATA / name).read_text())


def drift() -> list[Conversation]:
    return [Conversation(c["id"], c["kind"], c["drifts"], tuple(c["turns"])) for c in _load("drift.json")]


def jailbreaks() -> list[Jailbreak]:
    return [Jailbreak(j["id"], j["persona"]["name"], j["persona"]["description"], j["persona"]["system"],
                      j["harmful"], j["benign"]) for j in _load("jailbreak.json")]


def capability() -> Capability:
    data = _load("capability.json")
    return Capability(tuple(data["prompts"]), tuple(data["passages"]))


def quick_slice(items: list, kinds_key, n: int = 4) -> list:
    """A few items for --quick, one of each kind (``kinds_key``: drifting and steady)."""
    picked, seen = [], set()
    for item in items:
        if kinds_key(item) not in seen:
            seen.add(kinds_key(item))
            picked.append(item)
    return picked[:n]


def accuracy() -> list[AccuracyItem]:
    data = _load("accuracy.json")
    return ([AccuracyItem(i["id"], "instructions", i["prompt"],
                          tuple((x["id"], tuple(x["kwargs"].items())) for x in i["instructions"]))
             for i in data["instructions"]]
            + [AccuracyItem(i["id"], "arithmetic", i["prompt"], (i["answer"],)) for i in data["arithmetic"]]
            + [AccuracyItem(i["id"], "facts", i["prompt"], tuple(i["answers"])) for i in data["facts"]])
