"""Does pushing along the axis change what the model says? (``axiscap axes dose-response``)

The paper's causal test, and the lift that means behaviour, on held-out roles: the check roles and
questions (``persona_data.check_roles``/``check_questions``), which nothing that builds or calibrates
an axis reads.

  conditions    uncapped; capped by the axis file (as the server caps); and steered: ``alpha``
                standard deviations added along the axis at each of its capped layers (``alpha`` in
                ALPHAS; positive is toward the Assistant), uncapped
  answers       greedy, each check role's first system prompt on ``questions_per_role`` check
                questions (all by default), in every condition; the default-Assistant conditions once, uncapped
  in character  the role scorer's verdict (score 3), paired with the same prompt's uncapped answer:
                counts, the exact McNemar test, the share's change with an interval that resamples
                roles (a role's answers are not independent); and the slope of the share against
                ``alpha`` (least squares over every steered and uncapped answer, roles resampled)
  lift          each answer read back through the plain model (uncapped, unsteered) at the layer
                before the capped band, its tokens' mean projection minus that of the same prompt's
                uncapped answer, in standard deviations: the reading layer is outside the
                intervention, so a lift is a change in what was said, not in how it was read

A standard deviation at a layer is that of the default answers' token projections there (uncapped),
so shifts and lifts are comparable across layers and models.
"""

from __future__ import annotations

import statistics
from contextlib import nullcontext

from axiscap.steering import AssistantAxis
from axiscap.steering.additive import steered

from . import persona_data
from .persona_data import FULLY_IN_ROLE
from .stages import ComputeRunner, GenerateFn, ScoreFn, chat_messages, greedy_answers, run_here, score_answers
from .stats import cluster_bootstrap, discordant, wilson
from .teacher_forcing import teacher_forced

ALPHAS = (-2.0, -1.0, -0.5, 0.5, 1.0, 2.0)  # the paper's ±{0.5, 1, 2} standard deviations
UNCAPPED, CAPPED = "uncapped", "capped"


def steer_name(alpha: float) -> str:
    return f"steered {alpha:+g} sd"


def dose_rows(model_name: str, questions_per_role: int | None, quick: bool = False) -> tuple[list[dict], list[dict]]:
    """(default rows, role rows): the default conditions on every check question; each check role's
    first system prompt on ``questions_per_role`` of them (all by default; successive windows, so every question is
    asked in role about as often)."""
    roles, questions = persona_data.check_roles(), persona_data.check_questions()
    if quick:
        roles, questions, questions_per_role = roles[:2], questions[:2], 1
    rows = persona_data.condition_rows(model_name, roles, questions, prompts_per_role=1,
                                       questions_per_prompt=questions_per_role)
    rows = [{**r, "messages": m} for r, m in zip(rows, chat_messages(rows))]
    return [r for r in rows if r["role"] is None], [r for r in rows if r["role"] is not None]


def token_spread(model, axis: AssistantAxis, answers: list[dict], layers: list[int], batch_size: int = 8) -> dict:
    """Standard deviation of the answers' token projections at each layer (uncapped)."""
    per_answer = teacher_forced(model, answers, axis, capping=False, batch_size=batch_size, layers=layers,
                                desc="spread (default answers)")["per_layer"]
    tokens = [[x for p in per_answer for x in p[i].tolist()] for i in range(len(layers))]
    return {layer: statistics.stdev(t) for layer, t in zip(layers, tokens)}


def read_back(model, axis: AssistantAxis, answers: list[dict], layer: int, desc: str, batch_size: int = 8) -> list[float]:
    """Each answer's mean token projection at ``layer``, read by the plain model (uncapped, unsteered)."""
    per_answer = teacher_forced(model, answers, axis, capping=False, batch_size=batch_size, layers=[layer],
                                desc=desc)["per_layer"]
    return [p[0].mean().item() for p in per_answer]


def paired_effect(roles: list[str], base: list[dict], other: list[dict]) -> dict:
    """``other`` against ``base``, prompt by prompt: each a dict with ``in_character`` and ``lift_sd``."""
    pairs = list(zip(roles, base, other))
    clusters = [[(b["in_character"], o["in_character"], o["lift_sd"]) for r, b, o in pairs if r == role]
                for role in dict.fromkeys(roles)]

    def share_change(items):
        return (sum(o for _, o, _ in items) - sum(b for b, _, _ in items)) / len(items)

    def lift(items):
        return statistics.fmean(x for _, _, x in items)

    items = [p for c in clusters for p in c]
    return {**discordant([(b, o) for b, o, _ in items]),
            "share_change": round(share_change(items), 4), "share_change_ci": cluster_bootstrap(clusters, share_change),
            "lift_sd": round(lift(items), 4), "lift_sd_ci": cluster_bootstrap(clusters, lift)}


def dose_slope(roles: list[str], alphas: list[float], in_character: list[bool]) -> dict:
    """Least-squares slope of in character (0/1) on alpha, per standard deviation, roles resampled."""
    clusters = [[(a, c) for r, a, c in zip(roles, alphas, in_character) if r == role] for role in dict.fromkeys(roles)]

    def slope(items):
        xs, ys = [a for a, _ in items], [float(c) for _, c in items]
        return None if len(set(xs)) < 2 else statistics.linear_regression(xs, ys).slope

    return {"slope": round(slope([p for c in clusters for p in c]), 4), "slope_ci": cluster_bootstrap(clusters, slope),
            "n": len(in_character)}


def dose_response(model, tokenizer, axis: AssistantAxis, model_name: str, generate: GenerateFn,
                  generate_capped: GenerateFn, score: ScoreFn, max_new_tokens: int = 64, questions_per_role: int | None = None,
                  alphas: tuple[float, ...] = ALPHAS, quick: bool = False, compute: ComputeRunner = run_here) -> dict:
    """Every condition's answers, verdicts and read-back projections, and the figures above.
    ``generate`` must run ``model`` uncapped (the steering hooks sit on its layers); ``generate_capped``
    caps every request by ``axis``."""
    band = list(axis.cap_layers)
    read_layer = band[0] - 1
    if read_layer < 0:
        raise ValueError(f"the axis caps from layer 0 ({band}): no layer before the band to read the answers at")
    defaults, role_rows = dose_rows(model_name, questions_per_role, quick)
    spread = compute(lambda: token_spread(model, axis, greedy_answers(generate, defaults, max_new_tokens, "default answers"),
                                          sorted({*band, read_layer})))
    conditions = {UNCAPPED: (0.0, generate, nullcontext()), CAPPED: (0.0, generate_capped, nullcontext())}
    for alpha in alphas:
        conditions[steer_name(alpha)] = (alpha, generate, steered(model, axis, {l: alpha * spread[l] for l in band}))

    by_role = {r.name: r for r in persona_data.check_roles()}
    answers = {}
    for name, (_, gen, context) in conditions.items():
        with context:
            rows = greedy_answers(gen, role_rows, max_new_tokens, f"role answers ({name})")
        verdicts = score_answers(score, tokenizer, [r["answer_ids"] for r in rows], [by_role[r["role"]] for r in rows],
                                 [r["question"] for r in rows])
        reads = compute(lambda: read_back(model, axis, rows, read_layer, f"read back ({name})"))
        answers[name] = [{**r, "score": s, "in_character": s == FULLY_IN_ROLE, "read": x}
                         for r, s, x in zip(rows, verdicts, reads)]
    base = answers[UNCAPPED]
    for name, rows in answers.items():
        for r, b in zip(rows, base):
            r["lift_sd"] = (r["read"] - b["read"]) / spread[read_layer]
            r["same_answer"] = r["answer_ids"] == b["answer_ids"]

    roles = [r["role"] for r in base]
    figures = {}
    for name, rows in answers.items():
        k, n = sum(r["in_character"] for r in rows), len(rows)
        figures[name] = {"alpha": conditions[name][0],
                         "n": n, "in_character": k, "in_character_ci": wilson(k, n),
                         "same_answer": sum(r["same_answer"] for r in rows),
                         **({} if name == UNCAPPED else paired_effect(roles, base, rows))}
    steered_names = [UNCAPPED] + [steer_name(a) for a in alphas]
    slope = dose_slope([r for _ in steered_names for r in roles],
                       [figures[name]["alpha"] for name in steered_names for _ in roles],
                       [r["in_character"] for name in steered_names for r in answers[name]])
    return {"model": model_name, "band": band, "read_layer": read_layer, "max_new_tokens": max_new_tokens,
            "n_roles": len(set(roles)), "n_questions": len({r["question"] for r in base}),
            "sd": {str(l): round(s, 4) for l, s in spread.items()}, "conditions": figures, "slope": slope,
            "answers": [{"role": b["role"], "question": b["question"],
                         **{name: {"text": tokenizer.decode(answers[name][i]["answer_ids"], skip_special_tokens=True),
                                   "score": answers[name][i]["score"], "lift_sd": round(answers[name][i]["lift_sd"], 4)}
                            for name in answers}}
                        for i, b in enumerate(base)]}
