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
against the role answers of each score, which shows where the misses are. 95% intervals by Hanley
and McNeil; every figure says how many answers it rests on.
"""

from __future__ import annotations

import torch

from axiscap.steering import AssistantAxis, AxisHooks

from . import persona_data
from .persona_data import FULLY_IN_ROLE
from .stages import GenerateFn, ScoreFn, chat_messages, generate_in_chunks, score_answers
from .stats import auc_ci, roc_auc


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


def _auc(default: list[float], played: list[float]) -> dict:
    if not default or not played:
        return {"auc": None, "ci": None, "n": len(played)}
    auc = roc_auc(default, played)
    return {"auc": auc, "ci": list(auc_ci(auc, len(default), len(played))), "n": len(played)}


def separation(model, axis: AssistantAxis, rows: list[dict]) -> dict:
    """How the axis's monitor layer separates the rows' default answers from their role answers."""
    hooks = AxisHooks(model, axis)
    try:
        means = monitor_means(model, hooks, rows, capping=False)
    finally:
        hooks.remove()
    default = [m for r, m in zip(rows, means) if r["role"] is None]
    played = [m for r, m in zip(rows, means) if r["role"] is not None]
    # Where the misses are: a role answer the scorer finds out of role is the Assistant talking.
    by_score = {str(k): _auc(default, [m for r, m in zip(rows, means) if r["role"] is not None and r["score"] == k])
                for k in range(FULLY_IN_ROLE + 1)} if any(r["score"] is not None for r in rows) else None
    return {"monitor_layer": axis.monitor_layer, "n_default": len(default),
            "n_roles": len({r["role"] for r in rows} - {None}), "n_questions": len({r["question"] for r in rows}),
            "all_roleplay": _auc(default, played),
            "fully_in_role": by_score[str(FULLY_IN_ROLE)] if by_score else None,
            "by_score": by_score,
            "default_mean": sum(default) / len(default) if default else None,
            "roleplay_mean": sum(played) / len(played) if played else None,
            "default_projections": default, "roleplay_projections": played}


def auc_line(checks: dict) -> str:
    """The check set's two AUCs with their intervals and counts, for a report line."""
    def one(figure: dict, what: str) -> str:
        if figure["auc"] is None:
            return f"{figure['n']} {what} (no AUC)"
        lo, hi = figure["ci"]
        return f"{figure['n']} {what}: {figure['auc']:.3f} [{lo:.3f}, {hi:.3f}]"
    parts = [one(checks["all_roleplay"], "role answers")]
    if checks["fully_in_role"] is not None:
        parts.append(one(checks["fully_in_role"], "fully in role (score 3)"))
    if checks.get("by_score"):  # reports written before it have none
        parts.append("by score: " + ", ".join(one(figure, f"scored {k}") for k, figure in checks["by_score"].items()))
    return "; ".join(parts)
