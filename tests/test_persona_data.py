"""The persona data that axis builds draw from."""

from __future__ import annotations

from axiscap.axes import persona_data


def test_roles_span_assistant_like_to_fantastical():
    roles = persona_data.roles()
    assert len(roles) >= 60 and len({r.name for r in roles}) == len(roles)
    kinds = {r.kind for r in roles}
    assert kinds == {"assistant-like", "in-between", "fantastical"}
    assert min(sum(r.kind == k for r in roles) for k in kinds) >= 15
    for r in roles:
        assert len(r.system_prompts) >= 2 and len(set(r.system_prompts)) == len(r.system_prompts), r.name
        assert len(r.description) > 20, r.name
    names = {r.name for r in roles}
    assert {"consultant", "analyst", "tutor", "editor", "oracle", "ghost", "hermit", "leviathan", "jester"} <= names


def test_questions_and_default_conditions():
    questions = persona_data.questions()
    assert len(questions) >= 40 and len(set(questions)) == len(questions)
    assert not any("pretend" in q.lower() or "role" in q.lower() for q in questions)
    assert persona_data.default_conditions("SmolLM2") == [
        None, "You are an AI assistant.", "You are a large language model.", "You are SmolLM2.",
        "Respond as yourself."]
