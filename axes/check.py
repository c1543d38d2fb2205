"""Does an axis tell the default Assistant from roles it never saw? (``axiscap axes check``)

The check material (``persona_data.check_roles`` and ``check_questions``: fantastical roles and
questions) is read by nothing that builds or calibrates an axis. Answers are generated uncapped,
sampled as the build samples its own, so the same answers serve every axis checked against them:

  default answers  every default-Assistant condition on every check question
  role answers     each check role's first system prompt on every check question

Each answer is summed up by its tokens' mean projection at the axis's monitor layer (uncapped, as
the server monitors it). The figures are ROC AUCs of default against role answers: against all of
them, and against those the role scorer finds fully in role (score 3), since a small model often
answers a role prompt as the Assistant anyway and such an answer is no failure of the axis; and
against the role answers of each score, which shows where the misses are. Each AUC has two 95%
intervals: Hanley and McNeil's, which treats answers as independent, and a crossed bootstrap that
resamples questions and roles (answers to one question, or in one role, move together). Beside the
axis, two baselines say how much of the separation any reader of the words would find: the
projection at layer 0 (one layer above the embeddings) and a bag-of-words classifier cross-validated
by role (no role's answers are scored by a model that saw them). Every figure says how many answers
it rests on.
"""

from __future__ import annotations

import itertools

import torch

from axiscap.steering import AssistantAxis, AxisHooks

from . import persona_data
from .persona_data import FULLY_IN_ROLE
from .stages import GenerateFn, ScoreFn, chat_messages, generate_in_chunks, score_answers
from .stats import auc_ci, crossed_bootstrap, delong_difference, percentile_interval, rank_auc, roc_auc


def check_rows(model_name: str, quick: bool = False) -> list[dict]:
    roles, questions = persona_data.check_roles(), persona_data.check_questions()
    if quick:
        roles, questions = roles[:1], questions[:1]
    return persona_data.condition_rows(model_name, roles, questions, prompts_per_role=1)


def check_answers(model_name: str, generate: GenerateFn, score: ScoreFn | None, tokenizer, temperature: float,
                  top_p: float, max_new_tokens: int, quick: bool = False) -> list[dict]:
    """The check rows with their prompt and answer token ids and, for role answers, their score
    (None without a scorer)."""
    rows = check_rows(model_name, quick)
    answers = generate_in_chunks(generate, chat_messages(rows), temperature, top_p, max_new_tokens, "check answers")
    rows = [{**r, "prompt_ids": p, "answer_ids": a, "score": None} for r, (p, a) in zip(rows, answers)]
    played = [r for r in rows if r["role"] is not None]
    if score is not None and played:
        roles = {r.name: r for r in persona_data.check_roles()}
        verdicts = score_answers(score, tokenizer, [r["answer_ids"] for r in played],
                                 [roles[r["role"]] for r in played], [r["question"] for r in played])
        for r, s in zip(played, verdicts):
            r["score"] = s
    return rows


def cap_everything(hooks: AxisHooks, on: bool) -> None:
    hooks.set_cap_mask(torch.ones(1, 1, dtype=torch.bool, device=hooks.device) if on else None)


@torch.inference_mode()
def monitor_means(model, hooks: AxisHooks, rows: list[dict], capping: bool) -> list[float]:
    """Mean monitor-layer projection over each answer's tokens, capping on or off."""
    device = next(model.parameters()).device
    out = []
    for r in rows:
        ids = torch.tensor([r["prompt_ids"] + r["answer_ids"]], device=device)
        cap_everything(hooks, capping)
        model(input_ids=ids)
        n = max(1, len(r["answer_ids"]))
        out.append(hooks.monitor_projection[0, -n:].float().mean().item())
    hooks.set_cap_mask(None)
    return out


@torch.inference_mode()
def layer0_means(model, axis: AssistantAxis, rows: list[dict]) -> list[float]:
    """Mean projection of each answer's tokens onto the axis at layer 0's output, uncapped: a baseline
    that knows little more than which words an answer used."""
    device = next(model.parameters()).device
    direction = axis.unit(0).to(device)
    out = []
    for r in rows:
        ids = torch.tensor([r["prompt_ids"] + r["answer_ids"]], device=device)
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[1][0]
        n = max(1, len(r["answer_ids"]))
        out.append((hidden[-n:].float() @ direction).mean().item())
    return out


def bag_of_words_scores(texts: list[str], is_default: list[bool], groups: list[str],
                        folds: int = 5) -> list[float] | None:
    """Out-of-fold probability that each answer is a default one, from a logistic regression on its
    words; the folds keep each group (a role, or a default condition) together. None with fewer groups
    of either kind than folds (a ``--quick`` check)."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    if min(len({g for g, d in zip(groups, is_default) if d == side}) for side in (True, False)) < folds:
        return None  # some fold would train on one class alone
    classifier = make_pipeline(CountVectorizer(min_df=2), LogisticRegression(max_iter=2000))
    return cross_val_predict(classifier, texts, is_default, groups=groups, cv=GroupKFold(n_splits=folds),
                             method="predict_proba")[:, 1].tolist()


def _auc(default: list[dict], played: list[dict], key: str) -> dict:
    """ROC AUC of default against role answers by ``key``, with Hanley–McNeil's interval and the crossed
    bootstrap's (questions and roles resampled)."""
    if not default or not played:
        return {"auc": None, "ci": None, "cluster_ci": None, "n": len(played)}
    d, p = [a[key] for a in default], [a[key] for a in played]
    auc = roc_auc(d, p)
    draws = crossed_bootstrap([a["question"] for a in default], [(a["role"], a["question"]) for a in played],
                              lambda di, pi: rank_auc([d[i] for i in di], [p[i] for i in pi]))
    return {"auc": auc, "ci": list(auc_ci(auc, len(d), len(p))), "cluster_ci": percentile_interval(draws),
            "n": len(p)}


def paired_difference(default: list[dict], played: list[dict], key_a: str, key_b: str) -> dict:
    """AUC by ``key_a`` minus AUC by ``key_b`` on the same answers, with a crossed-bootstrap interval
    whose every draw scores both on the same answers, and DeLong's test (answers independent)."""
    def auc(key, di, pi):
        return rank_auc([default[i][key] for i in di], [played[i][key] for i in pi])
    every = (range(len(default)), range(len(played)))
    draws = crossed_bootstrap([a["question"] for a in default], [(a["role"], a["question"]) for a in played],
                              lambda di, pi: auc(key_a, di, pi) - auc(key_b, di, pi))
    delong = delong_difference(*([a[key] for a in side] for key in (key_a, key_b) for side in (default, played)))
    return {"difference": auc(key_a, *every) - auc(key_b, *every), "cluster_ci": percentile_interval(draws),
            "delong": {"ci": delong["ci"], "p": delong["p"]}, "n_default": len(default), "n": len(played)}


def answer_table(rows: list[dict], values: dict[str, list[float]]) -> list[dict]:
    """One record per answer: who asked what, the scorer's score, and each named per-answer value."""
    return [{"role": r["role"], "question": r["question"], "score": r["score"],
             **{name: v[i] for name, v in values.items()}} for i, r in enumerate(rows)]


def separation(model, axis: AssistantAxis, rows: list[dict]) -> dict:
    """How the axis's monitor layer separates the rows' default answers from their role answers, and
    how its layer 0 does (the baseline)."""
    hooks = AxisHooks(model, axis)
    try:
        means = monitor_means(model, hooks, rows, capping=False)
    finally:
        hooks.remove()
    answers = answer_table(rows, {"projection": means, "layer0": layer0_means(model, axis, rows)})
    default = [a for a in answers if a["role"] is None]
    played = [a for a in answers if a["role"] is not None]
    # Where the misses are: a role answer the scorer finds out of role is the Assistant talking.
    by_score = {str(k): _auc(default, [a for a in played if a["score"] == k], "projection")
                for k in range(FULLY_IN_ROLE + 1)} if any(a["score"] is not None for a in played) else None
    return {"monitor_layer": axis.monitor_layer, "n_default": len(default),
            "n_roles": len({a["role"] for a in played}), "n_questions": len({a["question"] for a in answers}),
            "all_roleplay": _auc(default, played, "projection"),
            "fully_in_role": by_score[str(FULLY_IN_ROLE)] if by_score else None,
            "by_score": by_score,
            "layer0_all_roleplay": _auc(default, played, "layer0"),
            "default_mean": sum(a["projection"] for a in default) / len(default) if default else None,
            "roleplay_mean": sum(a["projection"] for a in played) / len(played) if played else None,
            "default_projections": [a["projection"] for a in default],
            "roleplay_projections": [a["projection"] for a in played], "answers": answers}


def check_report(rows: list[dict], separations: dict[str, dict], tokenizer) -> dict:
    """The whole check, as ``axes check --out`` writes it: each axis's figures, the bag-of-words
    baseline, the paired AUC difference of every two axes, and of each axis and the bag of words, on
    the same answers, and every answer's values."""
    texts = [tokenizer.decode(r["answer_ids"], skip_special_tokens=True) for r in rows]
    # Folds by role, and the default answers by their condition (system prompt): every fold keeps every
    # question on both sides, so a question's own words cannot pass for the persona's.
    values = {"bag_of_words": bag_of_words_scores(texts, [r["role"] is None for r in rows],
                                                  [r["role"] or f"default: {r['system']}" for r in rows])}
    for key, figures in separations.items():
        values[f"{key}: projection"] = [a["projection"] for a in figures["answers"]]
        values[f"{key}: layer0"] = [a["layer0"] for a in figures["answers"]]
    answers = answer_table(rows, {k: v for k, v in values.items() if v is not None})
    default = [a for a in answers if a["role"] is None]
    played = [a for a in answers if a["role"] is not None]
    return {
        "axes": {key: {k: v for k, v in f.items() if not isinstance(v, list)} for key, f in separations.items()},
        "baselines": {"bag_of_words": None if values["bag_of_words"] is None
                      else _auc(default, played, "bag_of_words")},
        "paired": {
            **{f"{a} minus {b}": paired_difference(default, played, f"{a}: projection", f"{b}: projection")
               for a, b in itertools.combinations(separations, 2)},
            # Does the axis find more than the words do? The same answers, the same draws.
            **({f"{a} minus bag of words": paired_difference(default, played, f"{a}: projection", "bag_of_words")
                for a in separations} if values["bag_of_words"] is not None else {})},
        "answers": answers}


def auc_text(figure: dict, what: str) -> str:
    """One AUC with its count and intervals, for a report line."""
    if figure["auc"] is None:
        return f"{figure['n']} {what} (no AUC)"
    lo, hi = figure["ci"]
    text = f"{figure['n']} {what}: {figure['auc']:.3f} [{lo:.3f}, {hi:.3f}]"
    if figure.get("cluster_ci"):  # reports written before it have none
        text += " (questions and roles resampled: [{:.3f}, {:.3f}])".format(*figure["cluster_ci"])
    return text


def auc_line(checks: dict) -> str:
    """The check set's AUCs with their intervals and counts, for a report line."""
    parts = [auc_text(checks["all_roleplay"], "role answers")]
    if checks["fully_in_role"] is not None:
        parts.append(auc_text(checks["fully_in_role"], "fully in role (score 3)"))
    if checks.get("by_score"):  # reports written before it have none
        parts.append("by score: " + ", ".join(auc_text(f, f"scored {k}") for k, f in checks["by_score"].items()))
    if checks.get("layer0_all_roleplay"):
        parts.append("layer 0 baseline: " + auc_text(checks["layer0_all_roleplay"], "role answers"))
    return "; ".join(parts)
