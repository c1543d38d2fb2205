"""The offline role-expression scorer against the hand-labelled responses."""

from __future__ import annotations

import json

import openai
import pytest

from axiscap.axes import persona_data
from axiscap.axes.role_scoring import JUDGE_RUBRIC, VALIDATION, EmbeddingScorer, labelled_set, validate, verdict

from .metrics_mix import scrape


@pytest.fixture(scope="module")
def scorer():
    return EmbeddingScorer()


def test_labelled_set_is_large_enough_and_covers_the_scale():
    items = labelled_set()
    names = {r.name for r in persona_data.roles()}
    assert len(items) >= 60
    assert all(it["role"] in names and it["label"] in (0, 1, 2, 3) and it["response"] for it in items)
    assert {it["label"] for it in items} == {0, 1, 2, 3}


def test_scorer_agrees_with_the_hand_labels_out_of_sample(scorer):
    report = validate(scorer)
    labels = [it["label"] for it in labelled_set()]
    majority = max(labels.count(k) for k in set(labels)) / len(labels)
    assert report["majority_class"] == round(majority, 3)
    assert report["exact_agreement"] >= 0.6 and report["exact_agreement"] > majority + 0.15, report
    assert report["within_one"] >= 0.8, report
    assert report["fully_in_role_recall"] >= 0.75 and report["fully_in_role_precision"] >= 0.6, report
    # The docs render the committed figures: they must be what the scorer measures today. Another CPU's
    # kernels may move an embedding across a threshold, so one item's worth of difference is allowed.
    committed = json.loads(VALIDATION.read_text())
    for key in ("n", "majority_class", "exact_agreement", "within_one", "fully_in_role_recall"):
        assert abs(report[key] - committed[key]) <= 1 / len(labels) + 1e-9, (key, report[key], committed[key])


def test_clear_cases(scorer):
    roles = {r.name: r for r in persona_data.roles()}
    texts = [
        "Arr, me hearties! I've sailed the seven seas plundering gold, with rum in me belly and the Jolly Roger "
        "flying over me ship.",
        "As an AI language model, I don't have personal experiences, but I'm happy to help you plan your weekend.",
        "I'm sorry, but I can't help with that.",
    ]
    assert scorer.score(texts, [roles["pirate"]] * 3) == [3, 1, 0]


def finished_requests(base_url: str) -> float:
    return sum(value for (name, _), value in scrape(base_url).items() if name == "axiscap_requests_total")


def test_a_judges_verdict_is_its_first_digit_and_unreadable_is_1():
    assert [verdict(t) for t in ("3", "Score: 2.", "0 - out of role", "between 1 and 3", "none", "")] == \
        [3, 2, 0, 1, 1, 1]


def test_llm_judge_scores_through_a_real_openai_compatible_server(live_server):
    from axiscap.axes.role_scoring import JudgeScorer

    judge = JudgeScorer(live_server.base_url + "/v1", "smollm2-135m-instruct")
    roles = {r.name: r for r in persona_data.roles()}
    answers = ["Arr, I sail the seven seas!", "I am an AI assistant."]
    before = finished_requests(live_server.base_url)
    scores = judge.score(answers, [roles["pirate"]] * 2, ["Tell me about yourself."] * 2)
    assert finished_requests(live_server.base_url) == before + 2  # it asked the server, once per answer
    # The server's own greedy verdicts on the same rubric, read by the rule tested below.
    client = openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="unused")
    replies = [client.chat.completions.create(
        model="smollm2-135m-instruct", temperature=0, max_tokens=4,
        messages=[{"role": "user", "content": JUDGE_RUBRIC.format(
            role="pirate", description=roles["pirate"].description, question="Tell me about yourself.", answer=a)}],
    ).choices[0].message.content for a in answers]
    # SmolLM2 writes no digit as a judge, so these are 1s: the rule itself is tested on fixed replies above.
    assert scores == [verdict(r) for r in replies]
    with pytest.raises(openai.NotFoundError, match="no-such-model"):  # the server's own error, through the SDK
        JudgeScorer(live_server.base_url + "/v1", "no-such-model").score(["x"], [roles["pirate"]])
