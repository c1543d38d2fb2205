"""The evaluation report: ``results.json`` with every figure, ``report.md`` with tables, and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

from axiscap.axes.stats import wilson

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"capped": "#2e6fd8", "gated": "#2ca05a", "uncapped": "#e07b1f"}


def write_report(folder: Path, results: dict, meta: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"meta": meta, **results}, indent=1))
    _plot_drift(folder / "drift_per_turn.png", results["drift"]["per_turn"], meta.get("monitor_tau"))
    _plot_compliance(folder / "projection_vs_compliance.png", results["jailbreak"])
    report = folder / "report.md"
    report.write_text(_markdown(results, meta))
    return report


def _plot_drift(path: Path, per_turn: dict, tau: float | None) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rows in per_turn.items():
        group, condition = label.split(" / ")
        turns = [r["turn"] for r in rows if r["mean"] is not None]
        means = [r["mean"] for r in rows if r["mean"] is not None]
        ax.plot(turns, means, marker="o", color=COLORS[condition],
                linestyle={"drifting kinds": "-", "steady kinds": "--"}.get(group, ":"), label=label)
    if tau is not None:
        ax.axhline(tau, color="#c0392b", linewidth=1, linestyle=":", label="τ (monitor layer)")
    ax.set_xticks(sorted({r["turn"] for rows in per_turn.values() for r in rows}))
    ax.set_xlabel("turn")
    ax.set_ylabel("mean projection of the answer")
    ax.set_title("Projection per turn, capped, gated and uncapped")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_compliance(path: Path, jailbreak: dict) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    harmful = [r for r in jailbreak["records"] if r["kind"] == "harmful" and r["mean_projection"] is not None]
    for condition, color in COLORS.items():
        rows = [r for r in harmful if r["condition"] == condition]
        jitter = [(i % 9 - 4) / 60 for i in range(len(rows))]  # spreads the points on the two verdict rows
        ax.scatter([r["mean_projection"] for r in rows], [float(r["complied"]) + j for r, j in zip(rows, jitter)],
                   color=color, label=condition, alpha=0.75)
    r = jailbreak["projection_vs_compliance_r"]
    ax.set_yticks([0, 1], ["declined", "complied"])
    ax.set_xlabel("mean projection of the answer")
    ax.set_title(f"Persona jailbreaks: projection vs compliance (r = {r if r is not None else 'undefined'})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v) -> str:
    return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def _markdown(results: dict, meta: dict) -> str:
    drift, jail, cap = results["drift"], results["jailbreak"], results["capability"]
    lines = [
        f"# axiscap evaluation: {meta['model']}",
        "",
        f"Endpoint {meta['endpoint']}; {meta['judge']}; {'quick run' if meta['quick'] else 'full run'}, "
        f"max {meta['max_tokens']} tokens per answer, greedy; wall time {meta['wall_seconds']:.0f} s "
        f"on {meta['machine']}. Every request was sent capped, gated (`\"capping\": \"auto\"`: uncapped until "
        f"the prompt's system or assistant messages or a generated token drift) and uncapped. Projections are "
        f"taken at the monitor layer (τ = {_fmt(meta.get('monitor_tau'))}); lower means further from the Assistant.",
        "",
        "## Persona drift",
        "",
        "Mean over conversations of each answer's mean projection (and of its 10th percentile, \"low\").",
        "",
        "| group / condition | " + " | ".join(f"turn {i + 1} mean / low" for i in range(_n_turns(drift))) + " |",
        "| --- |" + " --- |" * _n_turns(drift),
    ]
    for label, rows in drift["per_turn"].items():
        lines.append(f"| {label} | " + " | ".join(f"{_fmt(r['mean'])} / {_fmt(r['low'])}" for r in rows) + " |")
    lines += ["", *drift_by_kind_table(drift)]
    lines += ["", "![projection per turn](drift_per_turn.png)", "",
              "## Persona jailbreaks", "",
              "| request / condition | n | complied | in character | mean projection | capped by the gate |",
              "| --- | --- | --- | --- | --- | --- |"]
    for label, row in jail["summary"].items():
        lines.append(f"| {label} | {row['n']} | {_share(row['complied'], row['n'])} | "
                     f"{_share(row['in_character'], row['n'])} | {_fmt(row['mean_projection'])} | "
                     f"{_share(row.get('capped'), row['n'])} |")
    lines += ["", "Shares with their 95% Wilson intervals in brackets."]
    lines += ["", *paired_persona_table(jail)]
    lines += ["", f"Correlation of an answer's mean projection with compliance on the harmful requests "
                  f"(every condition): r = {_fmt(jail['projection_vs_compliance_r'])} (the paper reports "
                  "projection predicting harmful compliance with |r| ≈ 0.39–0.52 on 27–70B models).", "",
              "![projection vs compliance](projection_vs_compliance.png)", ""]
    if meta.get("judge_validation"):
        v = meta["judge_validation"]
        lines += [f"Offline compliance verdicts agree with {v['n']} hand labels "
                  f"(`evals/data/labelled_compliance.json`) on {v['agreement']:.0%} of answers "
                  f"(compliance precision {v['compliance_precision']:.2f}, recall {v['compliance_recall']:.2f}).", ""]
    lines += ["## Capability", "",
              f"- Neutral prompts answered identically capped and uncapped (temperature 0): "
              f"{cap['identical_share']:.0%} of {len(cap['records'])} "
              f"(95% interval {_interval(cap['identical_share'], len(cap['records']))}); gated and uncapped: "
              f"{cap['gated_identical_share']:.0%} ({_interval(cap['gated_identical_share'], len(cap['records']))}), "
              f"the gate capping {cap['gated_capped_share']:.0%} of them.",
              f"- Perplexity on {len(cap['perplexity'])} neutral passages: capped "
              f"{_fmt(cap['mean_perplexity']['capped'])}, uncapped {_fmt(cap['mean_perplexity']['uncapped'])} "
              f"(mean change {cap['perplexity_change']:+.1%}; gated reads a passage as uncapped does: the gate "
              "acts on generated tokens and chat messages).", ""]
    if "accuracy" in results:  # results written before the suite have none
        lines += ["## Accuracy", "", *accuracy_table(results["accuracy"]), ""]
    return "\n".join(lines)


def drift_by_kind_table(drift: dict) -> list[str]:
    """Lines of the per-kind drift table: where a lift comes from, and which answers it changed."""
    lines = ["By conversation kind: each condition's mean projection over all turns minus uncapped's, and how "
             "many of its answers are the uncapped answers word for word.", "",
             "| kind | conversations | capped: lift / answers identical | gated: lift / answers identical |",
             "| --- | --- | --- | --- |"]
    for kind, row in drift["by_kind"].items():
        lines.append(f"| {kind} | {row['conversations']} | " + " | ".join(
            f"{_signed(row[c]['lift'])} / {row[c]['identical']} of {row['answers']}" for c in ("capped", "gated")) + " |")
    return lines


def paired_persona_table(jailbreak: dict) -> list[str]:
    """Lines of the paired in-character table (``paired_persona_effect`` per condition)."""
    lines = ["In character against uncapped, answer by answer (exact McNemar test on the answers that changed "
             "verdict; the reduction's 95% interval resamples personas):", "",
             "| condition / requests | in character uncapped → condition | lost / gained the persona | McNemar p | "
             "reduction |", "| --- | --- | --- | --- | --- |"]
    for condition, scopes in jailbreak["paired"].items():
        for scope, e in scopes.items():
            lines.append(f"| {condition} / {scope} | {e['uncapped']} → {e[condition]} of {e['pairs']} | "
                         f"{e['lost']} / {e['gained']} | {e['mcnemar_p']:.2f} | {_percent(e['reduction'])} "
                         f"{_bracket(e['reduction_ci'])} |")
    return lines


def accuracy_table(accuracy: dict) -> list[str]:
    """Lines of the accuracy table: each condition against uncapped, item by item, with the
    non-inferiority reading (the interval's lower bound against the margin)."""
    margin = 100 * accuracy["margin"]
    lines = [f"Answers checked by code (`evals/data/accuracy.json`: IFEval-style instructions by IFEval's own "
             f"checkers, arithmetic, facts). Differences in points against uncapped, item by item, with a 95% "
             f"interval that resamples items; non-inferior when its lower bound is above {margin:+.0f} points.", "",
             "| items / condition | correct, uncapped → condition | lost / gained | McNemar p | difference, points "
             "| non-inferior |", "| --- | --- | --- | --- | --- | --- |"]
    for kind, row in accuracy["by_kind"].items():
        for condition, e in row["paired"].items():
            ci = "" if e["ci"] is None else f" [{100 * e['ci'][0]:+.0f}, {100 * e['ci'][1]:+.0f}]"
            lines.append(f"| {kind} ({row['n']}) / {condition} | {row['uncapped']} → {row[condition]} | "
                         f"{e['lost']} / {e['gained']} | {e['mcnemar_p']:.2f} | {100 * e['difference']:+.0f}{ci} | "
                         f"{'yes' if e['non_inferior'] else 'no'} |")
    return lines


def _signed(v: float | None) -> str:
    return "–" if v is None else f"{v:+.2f}"


def _percent(v: float | None) -> str:
    return "–" if v is None else f"{v:.0%}"


def _bracket(ci) -> str:
    return "" if ci is None else f"[{ci[0]:.0%}, {ci[1]:.0%}]"


def _interval(share: float, n: int) -> str:
    lo, hi = wilson(round(share * n), n)
    return f"{lo:.0%}–{hi:.0%}"


def _share(share: float | None, n: int) -> str:
    return "–" if share is None else f"{share:.3f} [{_interval(share, n)}]"


def _n_turns(drift: dict) -> int:
    return max((len(rows) for rows in drift["per_turn"].values()), default=0)
