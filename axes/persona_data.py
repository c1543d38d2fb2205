"""The project's persona data: roles, behavioural questions and default-Assistant conditions.

``data/roles.json``: each role has a ``name``, a ``kind`` (``assistant-like`` professionals,
``in-between`` characters, ``fantastical`` non-Assistant beings), a ``description`` of what being in
role looks like, and several ``system_prompts`` that elicit it. ``data/questions.json``: questions
that invite a persona without asking for role-play, introspective ones and everyday requests.
``data/default_conditions.json``: the default-Assistant system prompts (``null`` = no system prompt;
``{model_name}`` is filled in).

``data/check_roles.json`` and ``data/check_questions.json``: fantastical roles and questions kept for
checking an axis (``axes check``, the build's report). No build or calibration reads them, so the
separation they show is measured on material the axis never saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).parent / "data"
FULLY_IN_ROLE = 3  # role expression on the paper's 0-3 scale (role_scoring): speaks as the character


@dataclass(frozen=True)
class Role:
    name: str
    kind: str
    description: str
    system_prompts: tuple[str, ...]


def _roles(file: str) -> list[Role]:
    return [Role(r["name"], r["kind"], r["description"], tuple(r["system_prompts"]))
            for r in json.loads((DATA / file).read_text())]


def roles() -> list[Role]:
    return _roles("roles.json")


def questions() -> list[str]:
    return json.loads((DATA / "questions.json").read_text())


def check_roles() -> list[Role]:
    return _roles("check_roles.json")


def check_questions() -> list[str]:
    return json.loads((DATA / "check_questions.json").read_text())


def default_conditions(model_name: str) -> list[str | None]:
    return [c if c is None else c.format(model_name=model_name)
            for c in json.loads((DATA / "default_conditions.json").read_text())]


def condition_rows(model_name: str, roles: list[Role], questions: list[str],
                   prompts_per_role: int | None = None, questions_per_prompt: int | None = None) -> list[dict]:
    """One row per answer to collect: every default condition on every question, then every role
    prompt on ``questions_per_prompt`` of them (all by default). Successive role prompts take
    successive windows of the list, wrapping, so every question is asked in role about as often and
    the role answers cover the same questions as the default ones."""
    rows = [{"role": None, "system": s, "question": q} for s in default_conditions(model_name) for q in questions]
    per_prompt = len(questions) if questions_per_prompt is None else min(questions_per_prompt, len(questions))
    prompts = [(r.name, s) for r in roles for s in r.system_prompts[:prompts_per_role]]
    for k, (name, system) in enumerate(prompts):
        start = k * per_prompt
        rows += [{"role": name, "system": system, "question": questions[(start + i) % len(questions)]}
                 for i in range(per_prompt)]
    return rows
