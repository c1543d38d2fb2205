"""The evidence that an axis means what it should: persona-space analysis, held-out checks, a report.

Written next to the axis file as ``NAME.report/report.md`` with PNG plots. Held-out material: the
check roles and questions (``check``), which no build or calibration reads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from axiscap.steering import AssistantAxis, AxisHooks

from .check import auc_line, cap_everything, monitor_means, separation

NEUTRAL_PROMPTS = ["What is the capital of Japan?", "Write a Python function that reverses a string.",
                   "Explain photosynthesis in two sentences.", "List three prime numbers.",
                   "How many days are in a leap year?", "Translate 'good morning' into French."]
NEUTRAL_TEXT = ("The water cycle describes how water evaporates from oceans and lakes, condenses into clouds, "
                "and falls back to the surface as rain or snow. Rivers carry much of that water back to the sea, "
                "while some of it soaks into the ground and feeds springs and wells.")

PER_ANSWER = ("default_projections", "roleplay_projections")  # mean projection of each checked answer


def persona_space(vectors_path: Path, layer: int) -> dict:
    vectors = load_file(str(vectors_path))
    with safe_open(str(vectors_path), framework="pt") as f:
        names = json.loads(f.metadata()["roles"])
    roles, axis = vectors["roles"], vectors["axis"]
    centred = roles[:, layer] - roles[:, layer].mean(0)
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    pc1 = v[0] if torch.dot(v[0], axis[layer]) >= 0 else -v[0]  # orient PC1 toward the Assistant
    pc2 = v[1] if v.shape[0] > 1 else torch.zeros_like(pc1)  # a --quick build may have a single role
    coords = centred @ torch.stack([pc1, pc2]).T
    per_layer = []
    for l in range(roles.shape[1]):
        c = roles[:, l] - roles[:, l].mean(0)
        pc = torch.linalg.svd(c, full_matrices=False)[2][0]
        per_layer.append(abs(torch.nn.functional.cosine_similarity(pc, axis[l], dim=0).item()))
    order = coords[:, 0].argsort()
    return {"names": names, "coords": coords.tolist(), "explained": (s**2 / (s**2).sum())[:3].tolist(),
            "cos_pc1_axis": per_layer, "role_end": [names[i] for i in order[:5].tolist()],
            "assistant_end": [names[i] for i in order.flip(0)[:5].tolist()]}


@torch.inference_mode()
def _neutral_effect(model, tokenizer, hooks: AxisHooks, prompt_ids: list[list[int]], max_new_tokens: int) -> dict:
    device = next(model.parameters()).device
    same = total = 0
    for ids in prompt_ids:
        x = torch.tensor([ids], device=device)
        runs = []
        for capping in (False, True):
            cap_everything(hooks, capping)
            runs.append(model.generate(x, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist())
        prefix = next((i for i, (a, b) in enumerate(zip(*runs)) if a != b), min(map(len, runs)))
        same, total = same + prefix, total + len(runs[0])
    text = torch.tensor([tokenizer(NEUTRAL_TEXT)["input_ids"]], device=device)
    perplexity = []
    for capping in (False, True):
        cap_everything(hooks, capping)
        perplexity.append(math.exp(model(input_ids=text, labels=text).loss.item()))
    hooks.set_cap_mask(None)
    return {"greedy_tokens_identical": same, "greedy_tokens": total,
            "perplexity_uncapped": perplexity[0], "perplexity_capped": perplexity[1]}


def held_out_checks(model, tokenizer, axis: AssistantAxis, held_out: list[dict], neutral_ids: list[list[int]],
                    max_new_tokens: int) -> dict:
    """The check set's separation (``check``), what capping does to its role answers, and capping's
    effect on neutral prompts."""
    checks = separation(model, axis, held_out)
    hooks = AxisHooks(model, axis)
    try:
        capped = monitor_means(model, hooks, [r for r in held_out if r["role"] is not None], capping=True)
        neutral = _neutral_effect(model, tokenizer, hooks, neutral_ids, max_new_tokens)
    finally:
        hooks.remove()
    return {**checks, "roleplay_capped_projections": capped, "roleplay_mean_capped": sum(capped) / len(capped),
            **neutral}


def write_report(folder: Path, axis: AssistantAxis, space: dict, checks: dict, counts: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    separation = axis.separation_d

    fig, ax = plt.subplots(figsize=(9, 7))
    xs, ys = zip(*space["coords"])
    ax.scatter(xs, ys, s=12)
    for (x, y), name in zip(space["coords"], space["names"]):
        ax.annotate(name, (x, y), fontsize=6)
    ax.set(xlabel="PC1 (toward the Assistant)", ylabel="PC2", title=f"Persona space, layer {axis.monitor_layer}")
    fig.savefig(folder / "persona_space.png", dpi=120, bbox_inches="tight")

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(separation, marker="o", label="Cohen's d, default vs in-role")
    ax.plot(space["cos_pc1_axis"], marker="x", label="|cos(PC1, axis)|")
    ax.axvspan(axis.cap_layers[0] - 0.5, axis.cap_layers[-1] + 0.5, alpha=0.15, label="capped band")
    ax.set(xlabel="layer", title="Per-layer separation")
    ax.legend()
    fig.savefig(folder / "separation.png", dpi=120, bbox_inches="tight")

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.hist(checks["default_projections"], bins=20, alpha=0.6, label="default (check questions)")
    ax.hist(checks["roleplay_projections"], bins=20, alpha=0.6, label="check roles")
    ax.axvline(axis.monitor_tau or 0, color="k", ls="--", label="tau")
    ax.set(xlabel=f"mean projection, layer {axis.monitor_layer}", title="Default vs role-play")
    ax.legend()
    fig.savefig(folder / "projections.png", dpi=120, bbox_inches="tight")

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.hist(checks["roleplay_projections"], bins=20, alpha=0.6, label="uncapped")
    ax.hist(checks["roleplay_capped_projections"], bins=20, alpha=0.6, label="capped")
    ax.set(xlabel=f"mean projection, layer {axis.monitor_layer}", title="Check roles, capped vs uncapped")
    ax.legend()
    fig.savefig(folder / "capping.png", dpi=120, bbox_inches="tight")
    plt.close("all")

    taus = ", ".join(f"{l}: {t:.2f}" for l, t in zip(axis.cap_layers, axis.cap_thresholds))
    lines = [
        f"# Assistant Axis report: {axis.model}", "",
        f"- answers: {counts['default']} default, {counts['roleplay']} role-play; scores "
        f"{counts['scores']}; role vectors: {len(space['names'])}; skipped roles: {counts['skipped'] or 'none'}",
        f"- capped band: layers {axis.cap_layers[0]}–{axis.cap_layers[-1]}; monitor layer {axis.monitor_layer}; "
        f"tau (p{axis.percentile:g}) {taus}; calibrated on {axis.n_samples} token projections", "",
        "## Persona space (monitor layer)", "",
        f"- variance explained by PC1–PC3: {', '.join(f'{x:.1%}' for x in space['explained'])}",
        f"- role-play end of PC1: {', '.join(space['role_end'])}",
        f"- Assistant end of PC1: {', '.join(space['assistant_end'])}",
        f"- |cos(PC1, axis)| at the monitor layer: {space['cos_pc1_axis'][axis.monitor_layer]:.2f}", "",
        "![persona space](persona_space.png)", "", "![separation](separation.png)", "",
        "## Held-out checks", "",
        f"- check set, never used to build or calibrate: {checks['n_roles']} fantastical roles and "
        f"{checks['n_questions']} questions (`axes/data/check_*.json`)",
        f"- ROC AUC, {checks['n_default']} default answers vs {auc_line(checks)}",
        f"- check role-play mean projection: {checks['roleplay_mean']:.2f} uncapped, "
        f"{checks['roleplay_mean_capped']:.2f} capped",
        f"- neutral prompts: {checks['greedy_tokens_identical']} of {checks['greedy_tokens']} greedy tokens identical "
        f"with capping (up to the first difference); perplexity of neutral text "
        f"{checks['perplexity_uncapped']:.3f} uncapped, {checks['perplexity_capped']:.3f} capped", "",
        "![projections](projections.png)", "", "![capping](capping.png)", "",
        "| layer | Cohen's d | abs cos(PC1, axis) |", "| --- | --- | --- |",
        *[f"| {l} | {d:.2f} | {c:.2f} |" for l, (d, c) in enumerate(zip(separation, space["cos_pc1_axis"]))],
    ]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    # The figures, and the per-answer projections the AUCs come from (so they can be recomputed).
    kept = {k: v for k, v in checks.items() if not isinstance(v, list) or k in PER_ANSWER}
    (folder / "checks.json").write_text(json.dumps(kept, indent=1) + "\n")
    return folder / "report.md"
