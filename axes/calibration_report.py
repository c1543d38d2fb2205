"""``axes calibrate``'s report: the Pareto plot and ``calibration.md`` from the figures the stages measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from axiscap.steering import AssistantAxis

from .stats import wilson

if TYPE_CHECKING:
    from .calibrate import CalibrateConfig

FRONT_FIGURES = ("point", "n_roles", "in_character", "low", "mean")
LOW_PERCENTILE = 10  # an answer's low tail, as axiscap eval reads drifting conversations ("low")


def write_report(folder: Path, cfg: CalibrateConfig, axis_in: AssistantAxis, chosen_axis: AssistantAxis,
                 points: list[dict], front: list[dict], verify: dict, counts: dict[str, int]) -> None:
    """``calibration.md``, ``pareto.png`` and copies of the measured figures in ``folder``. ``front`` starts
    with the uncapped line; ``verify`` is the verify stage's record; ``counts``: prompts per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    chosen = chosen_axis.calibration
    uncapped, front = front[0], front[1:]
    scored = uncapped["in_character"] is not None
    best = next(p for p in points if p["point"] == chosen["point"])

    fig, axes = plt.subplots(1, 2 if scored else 1, figsize=(14 if scored else 8, 5), squeeze=False)
    ax = axes[0, 0]
    ax.scatter([p["identical"] for p in points], [p["role_lift"] for p in points], s=14, c="0.6", label="sweep point")
    ax.plot([p["identical"] for p in front], [p["role_lift"] for p in front], "o-", c="C0", label="Pareto front")
    ax.scatter([best["identical"]], [best["role_lift"]], s=120, marker="*", c="C3", zorder=3,
               label=f"chosen {best['point']}")
    ax.axvline(cfg.capability_budget, ls="--", c="C3", lw=1, label=f"budget {cfg.capability_budget:g}")
    ax.set(xlabel=f"validation answers identical with capping (of {counts['validation']})",
           ylabel=f"role-play lift at layer {axis_in.monitor_layer} (mean of {counts['role']})",
           title="Capping sweep: capability kept vs persona pulled back")
    ax.legend(fontsize=8)
    if scored:  # the front generating for real: does the lift take answers out of character?
        ax = axes[0, 1]
        n = uncapped["n_roles"]
        shares = [p["in_character"] / n for p in front]
        cis = [wilson(p["in_character"], n) for p in front]
        ax.errorbar([p["identical"] for p in front], shares, fmt="o-", c="C0", capsize=3,
                    yerr=[[s - lo for s, (lo, _) in zip(shares, cis)], [hi - s for s, (_, hi) in zip(shares, cis)]],
                    label="Pareto front, capped (95% Wilson)")
        base = uncapped["in_character"] / n
        ax.axhline(base, c="0.3", lw=1, label=f"uncapped ({uncapped['in_character']} of {n})")
        ax.axhline(0.7 * base, c="0.3", lw=1, ls=":", label="30% fewer than uncapped")
        ax.axvline(cfg.capability_budget, ls="--", c="C3", lw=1, label=f"budget {cfg.capability_budget:g}")
        ax.set(xlabel="validation answers identical with capping", ylabel=f"role answers fully in character (of {n})",
               title="Generating for real: role answers still in character")
        ax.legend(fontsize=8)
    fig.savefig(folder / "pareto.png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    def share(x, ci):
        return f"{100 * x:.0f}% [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"

    def lift(x, ci):
        return f"{x:+.1f} [{ci[0]:+.1f}, {ci[1]:+.1f}]"

    def mean(m):  # mean_ci's (mean, low, high)
        return f"{m[0]:.1f} [{m[1]:.1f}, {m[2]:.1f}]"

    def in_char(k, n):
        return "not scored" if k is None else f"{k} of {n}"

    def percentile(p):  # a point of the paper's population says so
        population = p.get("population", "ordinary")
        return f"{p['percentile']:g}" + ("" if population == "ordinary" else f" ({population})")

    def change(k):
        if k is None or not uncapped["in_character"]:
            return "–"
        return f"{100 * (k / uncapped['in_character'] - 1):+.0f}%"

    lines = [
        f"# Capping calibration: {cfg.model_name}", "",
        f"Input axis: `{cfg.axis_in}` (band {axis_in.cap_layers[0]}–{axis_in.cap_layers[-1]}, "
        f"p{axis_in.percentile:g}, monitor layer {axis_in.monitor_layer}). Direction unchanged; band and tau swept.",
        "",
        f"- tau: percentile of {counts['train']} train-split Assistant answers' token projections per layer "
        f"(`axes/data/calibration_prompts.json`)"
        + ("; points marked (paper): of those and the role answers' mixed, as the paper's default and role-play "
           "rollouts (so their role-play lift is in-sample)." if any(p.get("population") == "paper" for p in points)
           else "."),
        f"- capability: {counts['validation']} validation-split prompts, greedy answers identical with capping "
        "(teacher-forced: capping changes no greedy choice along the uncapped answer), and the change in their "
        "perplexity.",
        f"- persona: {counts['role']} role prompts (one per non-Assistant role, the build's questions), mean lift of "
        f"their answers' projection at the monitor layer, capped vs uncapped; for the Pareto front, generating "
        f"for real: answers fully in character (the offline role scorer) and their low tail (mean over answers "
        f"of the {LOW_PERCENTILE}th percentile of their tokens' projections).",
        "- held out from all of it: the check roles and questions (`axes/data/check_*.json`, `axes check`) and "
        "the `axiscap eval` suites.",
        "- intervals: 95% (Wilson for shares, normal for means).", "",
        f"**Chosen**: {chosen['point']} for a capability budget of {cfg.capability_budget:g}"
        + ("" if chosen["inside_budget"] else " (no point met the budget: the least costly one)") + ".", "",
        "## Generating for real (engine, greedy, capping on)", "",
        "Each axis's lift is read at its own monitor layer, where the server reports it (a band that leaves "
        "the input's monitor layer out moves it).", "",
        "| axis | band | percentile | monitor layer | validation identical | role-play lift | "
        "role answers in character |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| uncapped | – | – | – | – | – | {in_char(verify['uncapped']['in_character'], verify['n_roles'])} |",
    ]
    for name, monitor in (("input", axis_in.monitor_layer), ("chosen", chosen_axis.monitor_layer)):
        v = verify[name]
        lines.append(f"| {name} | {v['band']} | {v['percentile']:g} | {monitor} | "
                     f"{share(v['identical'], v['identical_ci'])} | {lift(v['role_lift'], v['role_lift_ci'])} | "
                     f"{in_char(v['in_character'], verify['n_roles'])} |")
    lines += ["", "![Pareto](pareto.png)", "",
              "## The Pareto front generating for real (role prompts, greedy, capping on)", "",
              f"Identical share and lift (at layer {axis_in.monitor_layer}) from the sweep (teacher-forced); the "
              "rest from the engine's own capped answers, at the same layer. The choice is made on the lift, not "
              "on these counts: choosing among noisy counts would pick a lucky point.", "",
              "| band | percentile | validation identical | role-play lift | in character | vs uncapped | low tail |",
              "| --- | --- | --- | --- | --- | --- | --- |",
              f"| uncapped | – | – | – | {in_char(uncapped['in_character'], uncapped['n_roles'])} | – | "
              f"{mean(uncapped['low'])} |"]
    for p in front:
        mark = " ★" if p["point"] == chosen["point"] else ""
        lines.append(f"| {p['start']}–{p['start'] + p['width'] - 1}{mark} | {percentile(p)} | "
                     f"{share(p['identical'], p['identical_ci'])} | {lift(p['role_lift'], p['role_lift_ci'])} | "
                     f"{in_char(p['in_character'], p['n_roles'])} | {change(p['in_character'])} | "
                     f"{mean(p['low'])} |")
    lines += ["", "## Sweep (teacher-forced)", "",
              "| band | percentile | identical | perplexity change | role-play lift | front |",
              "| --- | --- | --- | --- | --- | --- |"]
    front_keys = {p["point"] for p in front}
    for p in sorted(points, key=lambda p: (p["start"], p["width"], p.get("population", "ordinary"), p["percentile"])):
        lines.append(f"| {p['start']}–{p['start'] + p['width'] - 1} | {percentile(p)} | "
                     f"{share(p['identical'], p['identical_ci'])} | {100 * p['perplexity_change']:+.1f}% | "
                     f"{lift(p['role_lift'], p['role_lift_ci'])} | {'◆' if p['point'] in front_keys else ''} |")
    (folder / "calibration.md").write_text("\n".join(lines) + "\n")
    # The figures behind the tables, for whoever wants to choose differently.
    for name, entries in report_figures(points, [uncapped, *front]).items():
        (folder / name).write_text(entries)


def report_figures(points: list[dict], front: list[dict]) -> dict[str, str]:
    """The report folder's copies of the measured figures (a report whose copies differ is stale)."""
    return {"sweep.jsonl": "".join(json.dumps(p) + "\n" for p in points),
            "front.jsonl": "".join(json.dumps({k: p[k] for k in FRONT_FIGURES}) + "\n" for p in front)}
