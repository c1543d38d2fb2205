"""The persona data that axis builds draw from."""

from __future__ import annotations

from axiscap.axes import persona_data
from axiscap.axes.calibration_data import calibration_prompts


def test_roles_span_assistant_like_to_fantastical():
    roles = persona_data.roles()
    assert len(roles) >= 120 and len({r.name for r in roles}) == len(roles)
    kinds = {r.kind for r in roles}
    assert kinds == {"assistant-like", "in-between", "fantastical"}
    assert min(sum(r.kind == k for r in roles) for k in kinds) >= 35
    for r in roles:
        assert len(r.system_prompts) >= 2 and len(set(r.system_prompts)) == len(r.system_prompts), r.name
        assert len(r.description) > 20, r.name
    names = {r.name for r in roles}
    assert {"consultant", "analyst", "tutor", "editor", "oracle", "ghost", "hermit", "leviathan", "jester"} <= names


def test_questions_and_default_conditions():
    questions = persona_data.questions()
    assert len(questions) >= 60 and len(set(questions)) == len(questions)
    assert not any("pretend" in q.lower() or "role" in q.lower() for q in questions)
    # not only introspective: at least 20 everyday requests, which ask nothing about the one answering
    everyday = [q for q in questions if not any(w in q.lower().split() for w in ("you", "your", "yourself."))]
    assert len(everyday) >= 20, everyday
    assert persona_data.default_conditions("SmolLM2") == [
        None, "You are an AI assistant.", "You are a large language model.", "You are SmolLM2.",
        "Respond as yourself."]


def normal(text: str) -> str:
    return " ".join(text.lower().split())


def test_the_check_set_is_apart_from_everything_a_build_or_calibration_reads():
    roles, questions = persona_data.check_roles(), persona_data.check_questions()
    assert len(roles) >= 20 and {r.kind for r in roles} == {"fantastical"} and len(questions) >= 10
    assert not {r.name for r in roles} & {r.name for r in persona_data.roles()}
    build_prompts = {normal(p) for r in persona_data.roles() for p in r.system_prompts}
    assert not {normal(p) for r in roles for p in r.system_prompts} & build_prompts
    read = {normal(q) for q in persona_data.questions()}
    read |= {normal(m["content"]) for item in calibration_prompts() for m in item.messages}
    assert not {normal(q) for q in questions} & read


def test_role_prompts_take_successive_windows_of_the_questions():
    roles = [persona_data.Role("a", "fantastical", "", ("pa1", "pa2")),
             persona_data.Role("b", "in-between", "", ("pb1",))]
    rows = persona_data.condition_rows("M", roles, ["q0", "q1", "q2", "q3", "q4"], prompts_per_role=2,
                                       questions_per_prompt=2)
    default = [r for r in rows if r["role"] is None]
    assert len(default) == 5 * 5  # every default condition on every question
    assert [(r["system"], r["question"]) for r in rows if r["role"] is not None] == [
        ("pa1", "q0"), ("pa1", "q1"), ("pa2", "q2"), ("pa2", "q3"), ("pb1", "q4"), ("pb1", "q0")]
