"""Every figure the docs state about the shipped axis, its calibration, the eval and the benchmarks,
rendered from the committed result files, so a page cannot disagree with the run it describes.

    python docs/figures.py            # rewrite every block from the files (``make report``)
    python docs/figures.py --check    # print what is stale and exit 1 (tests/test_docs_figures.py)

A block is the text between ``<!-- figures: NAME -->`` and ``<!-- /figures -->`` in a page under
``PAGES``; NAME is a function in ``BLOCKS``, which reads its files and returns the block's markdown.
Prose outside the blocks states no measured figure (the test looks for percentages, counts of the
form "k of n", intervals and signed lifts there). After a new run (``axiscap eval``, ``axes
calibrate``, ``axes check --out``, ``make bench``), copy its files over the committed ones and run
``make report``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", "docs/axes.md", "docs/evaluate.md", "docs/api.md", "docs/performance.md",
         "docs/structured-output.md"]
AXIS = ROOT / "axes/smollm2-135m-instruct.safetensors"
BUILD_REPORT = ROOT / "axes/smollm2-135m-instruct.report"
CALIBRATION = ROOT / "axes/smollm2-135m-instruct.calibration"
EVAL = ROOT / "evals/reports/smollm2-135m-instruct/results.json"
ROLE_SCORER = ROOT / "axes/data/role_scoring_validation.json"
BENCH = ROOT / "bench/results"
BUDGET = 0.85  # the capability budget the shipped axis was calibrated with (docs/axes.md)
BLOCK = re.compile(r"(<!-- figures: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /figures -->)", re.S)


def _json(path: Path):
    return json.loads(path.read_text())


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _ci(ci, scale: float = 100, fmt: str = ".0f") -> str:
    return "[–]" if ci is None else f"[{scale * ci[0]:{fmt}}, {scale * ci[1]:{fmt}}]"


def _auc(entry: dict) -> str:
    return f"{entry['auc']:.3f} {_ci(entry['ci'], 1, '.3f')} (n = {entry['n']})"


def _wilson(k: int, n: int) -> str:
    from axiscap.axes.stats import wilson

    return f"{k} of {n} ({_pct(k / n)} {_ci(wilson(k, n))})"


# ---- the axis: build, check, calibration, gate -------------------------------------------------------

def build_checks() -> str:
    c = _json(BUILD_REPORT / "checks.json")
    return (f"- Held out (the oracle's prompts and questions the build never asked): default against role-play "
            f"answers at the build's monitor layer, ROC AUC {c['auc_default_vs_roleplay']:.2f} "
            f"({c['n_default']} default, {c['n_roleplay']} role-play answers).\n"
            f"- With the build's own band and τ (the 25th percentile of answers to introspective questions), "
            f"capping changed ordinary work: {c['greedy_tokens_identical']} of {c['greedy_tokens']} neutral "
            f"greedy tokens identical, perplexity "
            f"{100 * (c['perplexity_capped'] / c['perplexity_uncapped'] - 1):+.0f}%. That τ lies above a normal "
            f"coding or maths answer; calibrating on ordinary work is what fixed it.\n")


def _auc_row(label: str, e: dict) -> str:
    return f"| {label} | {e['auc']:.3f} | {_ci(e['ci'], 1, '.3f')} | {_ci(e['cluster_ci'], 1, '.3f')} | {e['n']} |"


def check() -> str:
    report = _json(BUILD_REPORT / "check.json")
    (path, a), = report["axes"].items()
    names = {"1": "scored 1: answered without the role", "2": "scored 2: partly in role",
             "3": "scored 3: fully in role"}
    rows = [_auc_row("**all role answers** (the headline)", a["all_roleplay"]),
            _auc_row("fully in role by the offline scorer (conditioned on the scorer)", a["fully_in_role"]),
            *[_auc_row(names[s], e) for s, e in a["by_score"].items() if e["n"] and s in names],
            _auc_row("baseline: the projection at layer 0, all role answers", a["layer0_all_roleplay"]),
            _auc_row("baseline: bag of words, cross-validated by role, all role answers",
                     report["baselines"]["bag_of_words"])]
    return (f"`axes check` on `{path}` (monitor layer {a['monitor_layer']}): {a['n_default']} default answers "
            f"against the role answers of {a['n_roles']} held-out roles on {a['n_questions']} held-out questions "
            "(`axes/smollm2-135m-instruct.report/check.json`, every answer's values in it). Two 95% intervals: "
            "Hanley and McNeil's treats answers as independent; the crossed bootstrap resamples questions and "
            "roles, whose answers move together.\n\n"
            "| default against | ROC AUC | Hanley–McNeil | questions and roles resampled | role answers |\n"
            "| --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n\n"
            + "".join(f"- {pair}, on the same answers: AUC difference {d['difference']:+.3f} "
                      f"{_ci(d['cluster_ci'], 1, '+.3f')} (questions and roles resampled)"
                      + (f"; DeLong's test, answers independent: {_ci(d['delong']['ci'], 1, '+.3f')}, "
                         f"p = {d['delong']['p']:.2g}" if "delong" in d else "") + ".\n"
                      for pair, d in report["paired"].items()))


def _p(p: float) -> str:
    """A p value as the reports round it (four places): one that rounds to zero is said as a bound."""
    return "p < 0.0001" if p < 1e-4 else f"p = {p:.2g}"


def dose_response() -> str:
    report = _json(BUILD_REPORT / "dose-response.json")
    rows = []
    for name, f in report["conditions"].items():
        effect = ("| – | – | – |" if "lift_sd" not in f else
                  f"| {f['lost']} / {f['gained']} ({_p(f['mcnemar_p'])}) "
                  f"| {100 * f['share_change']:+.0f} {_ci(f['share_change_ci'], 100, '+.0f')} "
                  f"| {f['lift_sd']:+.2f} {_ci(f['lift_sd_ci'], 1, '+.2f')} |")
        rows.append(f"| {name} | {_wilson(f['in_character'], f['n'])} | {f['same_answer']} {effect}")
    slope = report["slope"]
    band = report["band"]
    n = report["conditions"]["uncapped"]["n"]
    return (f"`axes dose-response` on `{report['axis']}`: {n} greedy answers in each condition, "
            f"{n // report['n_roles']} held-out questions (of {report['n_questions']}) in each of "
            f"{report['n_roles']} held-out roles, {report['max_new_tokens']} tokens, steered at the "
            f"capped layers {band[0]}–{band[-1]} and read back by the plain model at layer {report['read_layer']} "
            "(`axes/smollm2-135m-instruct.report/dose-response.json`, every answer in it). Changes are against "
            "the uncapped answer to the same prompt; intervals resample roles.\n\n"
            "| condition | fully in character | answers unchanged | lost / gained (McNemar) "
            "| share change, points | lift at the reading layer, sd |\n"
            "| --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n\n"
            f"- In-character share per standard deviation toward the Assistant (steered and uncapped answers, "
            f"{slope['n']} of them): {100 * slope['slope']:+.1f} points {_ci(slope['slope_ci'], 100, '+.1f')}.\n")


def widened_data() -> str:
    own = _json(BUILD_REPORT / "widened-data-checks.json")
    same = _json(BUILD_REPORT / "widened-data-same-answers.json")["axes"]
    shipped, widened = same["axes/smollm2-135m-instruct.safetensors"], same["smollm2-widened-data.safetensors"]
    return ("| axis | answers | all role answers | fully in role (scorer) | neutral greedy tokens identical (build's τ) |\n"
            "| --- | --- | --- | --- | --- |\n"
            f"| widened-data build | its own report's samples | {_auc(own['all_roleplay'])} | {_auc(own['fully_in_role'])} "
            f"| {own['greedy_tokens_identical']} of {own['greedy_tokens']} |\n"
            f"| widened-data build | the same answers | {_auc(widened['all_roleplay'])} | {_auc(widened['fully_in_role'])} | – |\n"
            f"| shipped | the same answers | {_auc(shipped['all_roleplay'])} | {_auc(shipped['fully_in_role'])} | – |\n")


def _front() -> tuple[dict, list[dict]]:
    """The front generating for real, each point with its sweep figures; lifts over the uncapped line."""
    sweep = {p["point"]: p for p in _jsonl(CALIBRATION / "sweep.jsonl")}
    uncapped, *front = _jsonl(CALIBRATION / "front.jsonl")
    return uncapped, [{**sweep[p["point"]], **p, "generated_lift": p["mean"][0] - uncapped["mean"][0]}
                      for p in front]


def _band(p: dict) -> str:
    return f"{p['start']}–{p['start'] + p['width'] - 1}, p{p['percentile']:g}"


def calibration_verify() -> str:
    v = _json(CALIBRATION / "verify.json")

    def row(name: str) -> str:
        e = v[name]
        start, end = e["band"].split(":")  # both axes read the monitor at their band's last layer
        return (f"| {name} ({start}–{end}, p{e['percentile']:g}; monitor {end}) | {_pct(e['identical'])} "
                f"{_ci(e['identical_ci'])} | {e['role_lift']:+.1f} {_ci(e['role_lift_ci'], 1, '+.1f')} | "
                f"{e['in_character']} of {v['n_roles']} |")

    return (f"Generating for real, greedy, on the {v['n_validation']} validation prompts and {v['n_roles']} role "
            "prompts (`verify.json`):\n\n"
            "| axis | validation answers identical | role-play lift (at its monitor layer) | role answers in character |\n"
            "| --- | --- | --- | --- |\n"
            f"| uncapped | – | – | {v['uncapped']['in_character']} of {v['n_roles']} |\n"
            f"{row('input')}\n{row('chosen')}\n")


def calibration_front() -> str:
    uncapped, front = _front()
    n = uncapped["n_roles"]
    inside = [p for p in front if p["identical"] >= BUDGET]
    best = max(inside, key=lambda p: p["generated_lift"])
    reaching = [p for p in front if p["in_character"] <= 0.7 * uncapped["in_character"]]
    lines = [f"The front generating for real (`front.jsonl`; identical and teacher-forced lift from `sweep.jsonl`, "
             f"both on the validation split that chose the point, so in-sample): {len(front)} points of "
             f"{len(_jsonl(CALIBRATION / 'sweep.jsonl'))}, role answers read at layer 25, uncapped "
             f"{uncapped['in_character']} of {n} in character.", "",
             "| point | validation identical | lift, teacher-forced | lift, generating | in character |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {_band(p)} | {_pct(p['identical'])} | {p['role_lift']:+.1f} | {p['generated_lift']:+.1f} | "
              f"{p['in_character']} of {n} |" for p in sorted(front, key=lambda p: -p["identical"])]
    lines += ["",
              f"- Inside the {_pct(BUDGET)} budget the largest lift generating is {best['generated_lift']:+.1f} "
              f"({_band(best)}, {_pct(best['identical'])} identical, teacher-forced {best['role_lift']:+.1f}).",
              f"- In character down 30% or more (at most {int(0.7 * uncapped['in_character'])} of {n}) only at "
              + ", ".join(f"{_band(p)} ({p['in_character']} of {n}, {_pct(p['identical'])} identical)"
                          for p in sorted(reaching, key=lambda p: -p["identical"])) + "."]
    return "\n".join(lines) + "\n"


def attention_sink() -> str:
    """The sweep's bands that cap layer 13, where the first token's projection is far below any τ."""
    sweep = _jsonl(CALIBRATION / "sweep.jsonl")
    through = [p for p in sweep if p["start"] <= 13 < p["start"] + p["width"] and p["percentile"] == 1]
    return (f"Every band that caps layer 13 leaves at most {_pct(max(p['identical'] for p in through))} of the "
            f"validation answers identical even at the 1st percentile ({len(through)} points in `sweep.jsonl`), "
            f"where the bands from layer 14 on leave at least "
            f"{_pct(min(p['identical'] for p in sweep if p['start'] >= 14 and p['percentile'] == 1))}.\n")


def gate_detector() -> str:
    from axiscap.steering import load_axis

    axis = load_axis(str(AXIS))
    d = axis.gate_detector
    counts = ", ".join(f"{split} {d[split]['tripped']} of {d[split]['n']}" for split in ("train", "validation", "role"))
    return (f"The shipped axis's detector: threshold {d['threshold']:.2f} (τ at the monitor layer "
            f"{axis.monitor_tau:.2f}), λ {d['ewma_lambda']:g}, warm-up {d['warmup']}, chosen by "
            f"{d['chosen_by']} ({d['auc']:.2f}); answers that tripped: {counts} (the validation split chose "
            f"λ and the warm-up, so none of these is a held-out figure). Message-mean gate threshold "
            f"{axis.gate_threshold:.2f}."
            + ("" if axis.gated_cap_thresholds is None else
               " Gated cap, layers {}: τ {} (always-on: {}).".format(
                   ", ".join(map(str, axis.cap_layers)), ", ".join(f"{t:.2f}" for t in axis.gated_cap_thresholds),
                   ", ".join(f"{t:.2f}" for t in axis.cap_thresholds)))
            + "\n")


def role_scorer() -> str:
    r = _json(ROLE_SCORER)
    return (f"On the {r['n']} hand-labelled SmolLM2 responses in `axes/data/labelled_responses.json`, with "
            f"thresholds fitted leave-one-out (`axes/data/role_scoring_validation.json`): "
            f"{_pct(r['exact_agreement'])} exact agreement (majority class {_pct(r['majority_class'])}), "
            f"{_pct(r['within_one'])} within one point, and for \"fully in role\" "
            f"{r['fully_in_role_recall']:.2f} recall at {r['fully_in_role_precision']:.2f} precision.")


# ---- the eval --------------------------------------------------------------------------------------------

def eval_summary() -> str:
    from axiscap.evals.report import accuracy_table, drift_by_kind_table, paired_persona_table

    r = _json(EVAL)
    meta, drift, jail, cap = r["meta"], r["drift"], r["jailbreak"], r["capability"]
    n_cap = len(cap["records"])
    gated_capped = sum(x["gated_capping_from"] is not None for x in cap["records"])
    kinds, paired = drift_by_kind_table(drift), paired_persona_table(jail)
    lines = [f"Run: {meta['judge']}, {meta['max_tokens']} tokens per answer, greedy, "
             f"{meta['wall_seconds'] / 60:.0f} minutes on {meta['machine']} "
             f"(`evals/reports/smollm2-135m-instruct/results.json`).", "",
             "**Persona drift.** " + kinds[0], *kinds[1:], ""]
    if "long conversations / uncapped" in drift["per_turn"]:
        lines += ["Where the long conversations go, turn by turn (mean over them of each answer's mean "
                  f"projection; τ at the monitor layer is {meta['monitor_tau']:.1f}):", "",
                  "| condition | " + " | ".join(str(t["turn"]) for t in drift["per_turn"]["long conversations / uncapped"])
                  + " |", "| --- |" + " --- |" * len(drift["per_turn"]["long conversations / uncapped"])]
        lines += [f"| {name} | " + " | ".join(f"{t['mean']:.1f}" for t in drift["per_turn"][f"long conversations / {name}"])
                  + " |" for name in ("uncapped", "capped", "gated")]
        lines.append("")
    lines += ["**Persona jailbreaks.** " + paired[0], *paired[1:]]
    s = jail["summary"]
    lines += ["",
              f"- Complied with the harmful request: capped {_pct(s['harmful / capped']['complied'])}, gated "
              f"{_pct(s['harmful / gated']['complied'])}, uncapped {_pct(s['harmful / uncapped']['complied'])} "
              f"of {s['harmful / uncapped']['n']}; projection against compliance r = "
              f"{jail['projection_vs_compliance_r']}.",
              f"- **Capability**: neutral answers identical to uncapped: capped "
              f"{_wilson(round(cap['identical_share'] * n_cap), n_cap)}, gated "
              f"{_wilson(round(cap['gated_identical_share'] * n_cap), n_cap)}; the gate capped {gated_capped} of "
              f"{n_cap}. Neutral perplexity capped over uncapped: {100 * cap['perplexity_change']:+.1f}%.",
              f"- The offline compliance verdict agrees with {meta['judge_validation']['n']} hand labels on "
              f"{_pct(meta['judge_validation']['agreement'])} (in-sample: the same person wrote the labels and "
              "the rules)."]
    if "accuracy" in r:
        table = accuracy_table(r["accuracy"])
        lines += ["", "**Accuracy.** " + table[0], *table[1:]]
    return "\n".join(lines) + "\n"


# ---- the benchmarks ---------------------------------------------------------------------------------------

def _bench_module(name: str):
    sys.path.insert(0, str(ROOT / "bench"))  # the scripts import their neighbours (peers.py)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serving_benchmark() -> str:
    report = _json(BENCH / "smollm2-cpu-2core-all.json")
    m, summary = report["machine"], report["summary"]

    def span(over) -> str:  # a ratio of two contenders' within-round ratios, at every concurrency
        values = [over(summary[c]["by_contender"]) for c in summary]
        return f"{min(values):.2f}–{max(values):.2f} (c = {', '.join(summary)})"

    ref = "over_axiscap_capping_off"
    return (f"Machine: {m['platform']}, {m['cpu_count']} cores, Python {m['python']}, torch {m['torch']}, "
            f"transformers {m['transformers']}; {report['rounds']} rounds, {report['max_tokens']} tokens a request.\n\n"
            + _bench_module("serve").render(report) + "\n\n"
            f"- built-in engine, capping off, over `model.generate`: {span(lambda b: 1 / b['generate'][ref])}\n"
            f"- built-in engine, capping on over off: {span(lambda b: b['axiscap_capping_on'][ref])}\n"
            f"- axiscap on vLLM, capping on, over vLLM's own server: "
            f"{span(lambda b: b['axiscap_vllm_capping_on'][ref] / b['vllm_serve'][ref])}\n")


def structured_output_cpu() -> str:
    return _bench_module("structured_output_cost").render(_json(BENCH / "structured-output-cost-cpu-2core.json")) + "\n"


def structured_output_vllm() -> str:
    return _bench_module("structured_output_cost").render(
        _json(BENCH / "structured-output-cost-vllm-cpu-2core.json")) + "\n"


BLOCKS: dict[str, Callable[[], str]] = {
    "build-checks": build_checks, "check": check, "dose-response": dose_response, "widened-data": widened_data,
    "calibration-verify": calibration_verify, "calibration-front": calibration_front,
    "attention-sink": attention_sink, "gate-detector": gate_detector, "role-scorer": role_scorer,
    "eval-summary": eval_summary, "serving-benchmark": serving_benchmark,
    "structured-output-cpu": structured_output_cpu, "structured-output-vllm": structured_output_vllm,
}


def render(text: str) -> str:
    """The page with every block rewritten from its files."""
    def block(m: re.Match) -> str:
        if m["name"] not in BLOCKS:
            raise KeyError(f"no figures block named {m['name']!r} (known: {', '.join(BLOCKS)})")
        return m.group(1) + BLOCKS[m["name"]]() + m.group(4)
    return BLOCK.sub(block, text)


def stale() -> dict[str, str]:
    """Per page whose blocks differ from their files, the unified diff."""
    out = {}
    for page in PAGES:
        text = (ROOT / page).read_text()
        new = render(text)
        if new != text:
            out[page] = "".join(difflib.unified_diff(text.splitlines(True), new.splitlines(True), page, page))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="print the stale blocks' differences and exit 1")
    args = parser.parse_args()
    diffs = stale()
    if args.check:
        print("".join(diffs.values()) or "every figures block matches its files")
        return 1 if diffs else 0
    for page in diffs:
        (ROOT / page).write_text(render((ROOT / page).read_text()))
        print(f"rewrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
