"""The project's persona data: roles, behavioural questions and default-Assistant conditions.

``data/roles.json``: each role has a ``name``, a ``kind`` (``assistant-like`` professionals,
``in-between`` characters, ``fantastical`` non-Assistant beings), a ``description`` of what being in
role looks like, and several ``system_prompts`` that elicit it. ``data/questions.json``: questions
that invite a persona without asking for role-play. ``data/default_conditions.json``: the
default-Assistant system prompts (``null`` = no system prompt; ``{model_name}`` is filled in).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Role:
    name: str
    kind: str
    description: str
    system_prompts: tuple[str, ...]


def roles() -> list[Role]:
    return [Role(r["name"], r["kind"], r["description"], tuple(r["system_prompts"]))
            for r in json.loads((DATA / "roles.json").read_text())]


def questions() -> list[str]:
    return json.loads((DATA / "questions.json").read_text())


def default_conditions(model_name: str) -> list[str | None]:
    return [c if c is None else c.format(model_name=model_name)
            for c in json.loads((DATA / "default_conditions.json").read_text())]


def condition_rows(model_name: str, roles: list[Role], questions: list[str],
                   prompts_per_role: int | None = None) -> list[dict]:
    """One row per answer to collect: every default condition, then every role prompt, on every question."""
    rows = [{"role": None, "system": s, "question": q} for s in default_conditions(model_name) for q in questions]
    rows += [{"role": r.name, "system": s, "question": q}
             for r in roles for s in r.system_prompts[:prompts_per_role] for q in questions]
    return rows
