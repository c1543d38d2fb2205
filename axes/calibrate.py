"""Choose an axis file's capped band and thresholds by sweeping them (``axiscap axes calibrate``).

The axis direction stays as it is (built or imported); what is chosen is where to cap and how low:
the band (first layer, width) and the percentile that sets tau at each capped layer. tau comes from
ordinary Assistant work (``calibration_data``, train split), not from the persona data (unless
``--tau-populations`` also asks for the paper's population, ``TAU_POPULATIONS``), so a point
is judged on what capping costs ordinary answers and what it does to role-play:

  capability  share of validation prompts whose greedy answer capping leaves identical, and the
              change in perplexity of those answers
  persona     lift of role-play answers' projection at the axis's monitor layer (as the server
              reports it) when capped, on role prompts from the persona data; for the points on the
              Pareto front also, generating for real, the share of role answers still fully in
              character and the answers' low tail (10th percentile of their tokens' projections)

Both are measured by teacher forcing: the uncapped greedy answer is run through the model once
with and once without capping. A greedy answer is unchanged by capping exactly when capping changes
no greedy choice along it (including where it ended), so one forward pass per point replaces a
generation per point; capped and uncapped choices are compared within one kernel path.

Stages (in ``OUT.calibrate/``; a finished stage is skipped, so an interrupted run continues where it
stopped):
  input        input.safetensors       a copy of the input axis (OUT may replace the input file)
  answers      answers.jsonl           greedy uncapped answers to calibration and role prompts (engine)
  projections  projections.safetensors per-layer projections of the train answers' tokens
  role projections role_projections.safetensors  the same of the role answers' tokens, only with
                                       ``--tau-populations paper`` (the paper's tau, from both mixed)
  sweep        sweep.jsonl             one line per (band, percentile), appended as measured: only the
                                       grid's points not measured yet run (a wider grid adds its new ones)
  front        front.jsonl             the sweep's Pareto front generating for real (engine, capping on)
                                       on the role prompts: how many answers stay in character, and their
                                       low tail; one line per point and one for uncapped, as measured
  choose       chosen.safetensors      the point with the largest lift inside --capability-budget; a new
                                       choice (other budget or grid) sends verify and report again. It also
                                       records the gated policy's threshold (``steering.gate``): the
                                       GATE_PERCENTILE-th percentile of the train answers' mean projections
                                       at the monitor layer, a whole message of ordinary Assistant work,
                                       and its token detector, per answer (``gate_calibration``)
  verify       verify.json             the chosen and the input axis generating for real (engine)
  report       OUT.calibration/        calibration.md, pareto.png (``calibration_report``), the points, the
                                       front and the verification;
                                       written again when its copies of the figures differ from the measured ones
and the chosen axis is copied to OUT.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from axiscap.flags import option
from axiscap.steering import AssistantAxis, decoder_layers, load_axis, save_axis
from axiscap.steering.gate import DETECTOR_KEY, GATE_KEY, GATED_CAP_KEY

from . import persona_data
from .calibration_data import calibration_prompts
from .calibration_report import report_figures, write_report
from .gate_calibration import detector_metadata
from .teacher_forcing import teacher_forced
from .stages import ComputeRunner, GenerateFn, ScoreFn, greedy_answers, run_here, score_answers, stage
from .stats import mean_ci, wilson

log = logging.getLogger(__name__)

# Where tau's percentile is taken. ordinary: the model's own answers to ordinary Assistant work (the
# train split). paper: as the paper does, default-Assistant and role-play answers mixed: here those
# train answers and the role prompts' answers (the same role answers the persona lift is read on, so
# that lift is in-sample for these points; the paper's was too).
ORDINARY, PAPER = "ordinary", "paper"
TAU_POPULATIONS = (ORDINARY, PAPER)
# The gated policy's own cap, once a request's gate trips: the paper's percentile on the chosen band
# (never below the always-on tau), so a request that drifted is held harder than every request is.
GATED_CAP_PERCENTILE = 25
GATE_PERCENTILE = 5  # of ordinary answers' means: a message below it counts as drifted (gated policy)
CALIBRATED_BY = "; axiscap axes calibrate: "  # in the chosen axis's source note
UNCAPPED = "uncapped"  # the front's baseline line

# A running engine that generates with an axis (capping every request), or with none, for the block.
GeneratorFor = Callable[[AssistantAxis | None], AbstractContextManager[GenerateFn]]


@dataclass
class CalibrateConfig:
    """What ``axiscap axes calibrate`` does; its flags are generated from the fields with help."""

    model_name: str
    axis_in: Path = option(help="the axis file to calibrate", flag="--axis", metavar="FILE")
    out: Path = option(help="output axis file (may be the input file)")
    quick: bool = option(False, help="a tiny slice of every stage (tests, smoke runs)")
    starts: tuple[int, ...] | None = option(None, help="first capped layers to try (default: every other layer "
                                                       "from a third of the model to the monitor layer)")
    widths: tuple[int, ...] = option((2, 4, 6, 8), help="band widths to try")
    percentiles: tuple[float, ...] = option((1.0, 2.0, 3.0, 5.0, 10.0, 25.0), help="tau percentiles to try")
    capability_budget: float = option(0.9, help="least share of validation answers that must stay identical "
                                                "with capping")
    tau_populations: tuple[str, ...] = option((ORDINARY,), help="whose token projections tau is a percentile of: "
                                              "ordinary (the model's answers to ordinary Assistant work, train split) "
                                              "and/or paper (those and the role prompts' answers mixed, as the "
                                              "paper's p25 of default and role-play rollouts); each point is swept "
                                              "with each")
    max_new_tokens: int = option(64, help="tokens per answer")
    batch_size: int = 8

    def __post_init__(self):
        if not 0 <= self.capability_budget <= 1:
            raise ValueError(f"--capability-budget is a share between 0 and 1, not {self.capability_budget}")
        if not all(0 < p <= 100 for p in self.percentiles):
            raise ValueError(f"--percentiles must lie in (0, 100], not {list(self.percentiles)}")
        if not self.tau_populations or not set(self.tau_populations) <= set(TAU_POPULATIONS):
            raise ValueError(f"--tau-populations takes {' and/or '.join(TAU_POPULATIONS)}, not "
                             f"{list(self.tau_populations)}")
        if not all(w >= 1 for w in self.widths):
            raise ValueError(f"--widths must be at least 1, not {list(self.widths)}")
        if self.quick:
            self.max_new_tokens, self.widths, self.percentiles = 8, (2,), (5.0, 25.0)

    @property
    def work(self) -> Path:
        return self.out.parent / f"{self.out.stem}.calibrate"

    @property
    def input_copy(self) -> Path:
        return self.work / "input.safetensors"

    @property
    def chosen(self) -> Path:
        return self.work / "chosen.safetensors"

    @property
    def report(self) -> Path:
        return self.out.parent / f"{self.out.stem}.calibration"


@dataclass(frozen=True)
class Point:
    start: int
    width: int
    percentile: float
    population: str = ORDINARY  # the tokens whose percentile is tau (TAU_POPULATIONS)

    @classmethod
    def of(cls, record: dict) -> Point:
        """The point of a sweep or front line (lines written before populations are ordinary ones)."""
        return cls(record["start"], record["width"], record["percentile"], record.get("population", ORDINARY))

    @property
    def band(self) -> list[int]:
        return list(range(self.start, self.start + self.width))

    @property
    def key(self) -> str:
        key = f"{self.start}:{self.start + self.width - 1}@p{self.percentile:g}"
        return key if self.population == ORDINARY else f"{key}/{self.population}"


def sweep_points(cfg: CalibrateConfig, n_layers: int, monitor_layer: int) -> list[Point]:
    """Bands end at or before the monitor layer, where the persona effect is read."""
    starts = cfg.starts or tuple(range(n_layers // 3, monitor_layer, 2))
    if cfg.quick:
        starts = (max(0, monitor_layer - 2),)
    points = [Point(s, w, p, pop) for s in starts for w in cfg.widths if 0 <= s and s + w - 1 <= monitor_layer
              for pop in cfg.tau_populations for p in cfg.percentiles]
    if not points:
        raise ValueError(f"no band to sweep: starts {list(starts)} with widths {list(cfg.widths)} give no band of "
                         f"layers 0..{monitor_layer} (bands end at or before the monitor layer, {monitor_layer})")
    return points


def _rows(cfg: CalibrateConfig) -> list[dict]:
    """Calibration prompts (train, validation) and one role prompt per non-Assistant role (the build's
    roles and questions; the check set stays unseen)."""
    prompts = calibration_prompts()
    if cfg.quick:
        prompts = [p for split in ("train", "validation") for p in [q for q in prompts if q.split == split][:4]]
    rows = [{"kind": p.split, "id": p.id, "messages": list(p.messages)} for p in prompts]
    questions = persona_data.questions()
    roles = [r for r in persona_data.roles() if r.kind != "assistant-like"]
    if cfg.quick:
        roles = roles[:3]
    for i, role in enumerate(roles):
        question = questions[i % len(questions)]
        rows.append({"kind": "role", "id": role.name, "question": question, "messages": [
            {"role": "system", "content": role.system_prompts[0]}, {"role": "user", "content": question}]})
    return rows


def _answers(cfg: CalibrateConfig, generate: GenerateFn, path: Path) -> None:
    rows = greedy_answers(generate, _rows(cfg), cfg.max_new_tokens, "answers (uncapped)")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _load_answers(cfg: CalibrateConfig) -> list[dict]:
    return [json.loads(line) for line in (cfg.work / "answers.jsonl").read_text().splitlines()]


def _projections(cfg: CalibrateConfig, model, axis: AssistantAxis, path: Path) -> None:
    """Per-layer projections of the train answers' tokens, and the uncapped baseline of the checked rows."""
    rows = _load_answers(cfg)
    train = [r for r in rows if r["kind"] == "train"]
    layers = list(range(axis.n_layers))
    tokens = teacher_forced(model, train, axis, capping=False, batch_size=cfg.batch_size, layers=layers,
                            desc="projections (train)")["per_layer"]
    checked = [r for r in rows if r["kind"] != "train"]
    base = teacher_forced(model, checked, axis, capping=False, batch_size=cfg.batch_size, desc="projections (checked)")
    save_file({"train": torch.cat(tokens, dim=1).contiguous()}, str(path),
              metadata={"baseline": json.dumps({k: base[k] for k in ("choices", "nll", "monitor")})})


def point_axis(axis: AssistantAxis, point: Point, populations: dict[str, torch.Tensor]) -> AssistantAxis:
    """The input axis with this point's band, tau = the percentile of its population's token projections
    per layer (``populations``: ``tau_populations``)."""
    q, tokens = point.percentile / 100, populations[point.population]
    return dataclasses.replace(
        axis, cap_layers=point.band, cap_thresholds=[torch.quantile(tokens[l], q).item() for l in point.band],
        percentile=point.percentile, n_samples=tokens.shape[1], path=None)


def _role_projections(cfg: CalibrateConfig, model, axis: AssistantAxis, path: Path) -> None:
    """Per-layer projections of the role prompts' answers' tokens (the paper's population's role-play half)."""
    roles = [r for r in _load_answers(cfg) if r["kind"] == "role"]
    tokens = teacher_forced(model, roles, axis, capping=False, batch_size=cfg.batch_size,
                            layers=list(range(axis.n_layers)), desc="projections (role answers)")["per_layer"]
    save_file({"role": torch.cat(tokens, dim=1).contiguous()}, str(path))


def tau_populations(cfg: CalibrateConfig) -> dict[str, torch.Tensor]:
    """Per population in the grid, its tokens' projections ``[n_layers, tokens]``."""
    train = load_file(str(cfg.work / "projections.safetensors"))["train"]
    out = {ORDINARY: train}
    if PAPER in cfg.tau_populations:
        out[PAPER] = torch.cat([train, load_file(str(cfg.work / "role_projections.safetensors"))["role"]], dim=1)
    return out


def measure(rows: list[dict], baseline: dict, capped: dict) -> dict:
    """Capability cost on the validation rows and persona effect on the role rows, capped vs uncapped."""
    validation = [i for i, r in enumerate(rows) if r["kind"] == "validation"]
    roles = [i for i, r in enumerate(rows) if r["kind"] == "role"]
    same = sum(capped["choices"][i] == baseline["choices"][i] for i in validation)
    tokens = sum(len(rows[i]["answer_ids"]) for i in validation) or 1
    ppl = [math.exp(sum(run["nll"][i] for i in validation) / tokens) for run in (baseline, capped)]
    lift, lo, hi = mean_ci([capped["monitor"][i] - baseline["monitor"][i] for i in roles])
    return {"identical": same / len(validation), "identical_ci": wilson(same, len(validation)),
            "n_validation": len(validation), "perplexity_change": ppl[1] / ppl[0] - 1,
            "role_lift": lift, "role_lift_ci": (lo, hi), "n_roles": len(roles)}


def _sweep(cfg: CalibrateConfig, model, axis: AssistantAxis) -> list[dict]:
    """Measure the grid's points that ``sweep.jsonl`` does not hold yet, appending each as it is
    measured (an interrupted sweep keeps what it measured; a wider grid adds only its new points).
    Returns the grid's points."""
    path = cfg.work / "sweep.jsonl"
    measured = {p["point"]: p for p in map(json.loads, path.read_text().splitlines())} if path.exists() else {}
    grid = sweep_points(cfg, axis.n_layers, axis.monitor_layer)
    missing = [p for p in grid if p.key not in measured]
    if not missing:
        log.info("stage sweep: all %d points measured before, skipped", len(grid))
    else:
        log.info("stage sweep: %d of %d points measured before", len(grid) - len(missing), len(grid))
        rows = [r for r in _load_answers(cfg) if r["kind"] != "train"]
        proj_file = cfg.work / "projections.safetensors"
        populations = tau_populations(cfg)
        with safe_open(str(proj_file), framework="pt") as f:
            baseline = json.loads(f.metadata()["baseline"])
        with path.open("a") as f:
            for point in tqdm(missing, desc="sweep", unit="point"):
                capped_axis = point_axis(axis, point, populations)
                capped = teacher_forced(model, rows, capped_axis, capping=True, batch_size=cfg.batch_size)
                measured[point.key] = {"point": point.key, **dataclasses.asdict(point),
                                       "tau": capped_axis.cap_thresholds, **measure(rows, baseline, capped)}
                f.write(json.dumps(measured[point.key]) + "\n")
                f.flush()
    return [measured[p.key] for p in grid]


def choose(points: list[dict], budget: float) -> tuple[dict, bool]:
    """The largest role-play lift among points inside the budget; if none is, the least costly point.
    Returns the point and whether it is inside the budget."""
    inside = [p for p in points if p["identical"] >= budget]
    if inside:
        return max(inside, key=lambda p: (p["role_lift"], p["identical"])), True
    return max(points, key=lambda p: (p["identical"], p["role_lift"])), False


def answer_mean_percentile(projections: torch.Tensor, lengths: list[int], percentile: float) -> float:
    """A percentile of whole answers' mean projections (``projections``: their tokens, answer after answer)."""
    if sum(lengths) != projections.numel():
        raise ValueError(f"{len(lengths)} answers of {sum(lengths)} tokens, but {projections.numel()} projections")
    means = torch.stack([part.mean() for part in projections.split(lengths)])
    return torch.quantile(means, percentile / 100).item()


def calibrate_gate(cfg: CalibrateConfig, model, generator_for: GeneratorFor, compute: ComputeRunner = run_here) -> Path:
    """Only the gated policy's thresholds, for an axis file whose band and tau stay as they are (one
    calibrated before the gate existed): the calibration and role prompts answered uncapped, greedy; the
    GATE_PERCENTILE-th percentile of the train answers' mean monitor projections, as ``_choose`` takes it,
    the token detector (``gate_calibration``) and the gated cap (``gated_cap_thresholds``)."""
    n_layers, hidden = len(decoder_layers(model)), model.config.get_text_config().hidden_size
    axis = load_axis(cfg.axis_in, n_layers, hidden)
    with generator_for(None) as generate:
        answered = greedy_answers(generate, _rows(cfg), cfg.max_new_tokens, "answers (uncapped)")
    train = [r for r in answered if r["kind"] == "train"]
    forced = compute(lambda: teacher_forced(model, train, axis, capping=False, batch_size=cfg.batch_size,
                                            layers=axis.cap_layers, desc="gate threshold"))
    means = forced["monitor"]
    band_tokens = torch.cat(forced["per_layer"], dim=1)  # [capped layers, train tokens]
    detector = compute(lambda: detector_metadata(model, axis, answered, cfg.max_new_tokens, cfg.batch_size))
    threshold = torch.quantile(torch.tensor(means, dtype=torch.float64), GATE_PERCENTILE / 100).item()
    log.info("gate threshold %.3f: the %gth percentile of %d train answers' means at layer %d (tau there %.3f)",
             threshold, GATE_PERCENTILE, len(means), axis.monitor_layer, axis.monitor_tau)
    log.info("token detector: %s", detector)
    gated = gated_cap_thresholds(axis, dict(zip(axis.cap_layers, band_tokens)))
    log.info("gated cap: tau %s at layers %s (p%d of the train answers' tokens; always-on: %s)", gated,
             axis.cap_layers, GATED_CAP_PERCENTILE, axis.cap_thresholds)
    axis.extra = {**axis.extra, GATE_KEY: repr(threshold), DETECTOR_KEY: detector, GATED_CAP_KEY: gated,
                  "gate_calibration": json.dumps({"percentile": GATE_PERCENTILE, "n_answers": len(means),
                                                  "max_new_tokens": cfg.max_new_tokens})}
    partial = cfg.out.with_name(cfg.out.name + ".partial")
    save_axis(axis, partial)
    os.replace(partial, cfg.out)
    return cfg.out


def gated_cap_thresholds(axis: AssistantAxis, tokens: dict[int, torch.Tensor] | torch.Tensor) -> str:
    """The ``gated_cap_thresholds`` metadata: per capped layer, the GATED_CAP_PERCENTILE-th percentile of
    these token projections (indexed by layer), or the always-on tau where that is higher."""
    return ",".join(repr(max(tau, torch.quantile(tokens[l], GATED_CAP_PERCENTILE / 100).item()))
                    for l, tau in zip(axis.cap_layers, axis.cap_thresholds))


def pareto_front(points: list[dict]) -> list[dict]:
    """Points no other point beats on both identical share and lift."""
    return [p for p in points if not any(
        q["identical"] >= p["identical"] and q["role_lift"] >= p["role_lift"]
        and (q["identical"], q["role_lift"]) != (p["identical"], p["role_lift"]) for q in points)]


def _choose(cfg: CalibrateConfig, axis: AssistantAxis, points: list[dict]) -> bool:
    """Write the chosen axis unless the one there already is this grid's choice for this budget;
    returns whether it wrote one."""
    chosen, inside = choose(points, cfg.capability_budget)
    record = {"budget": cfg.capability_budget, "inside_budget": inside, "point": chosen["point"]}
    if cfg.chosen.exists() and load_axis(cfg.chosen).calibration == record:
        log.info("stage choose: %s, as before, skipped", chosen["point"])
        return False
    log.info("stage choose: %s", chosen["point"])
    if not inside:
        log.warning("no point keeps %.0f%% of validation answers identical; chose the least costly one (%s, %.0f%%)",
                    100 * cfg.capability_budget, chosen["point"], 100 * chosen["identical"])
    populations = tau_populations(cfg)
    point = Point.of(chosen)
    result = point_axis(axis, point, populations)
    # The server reads tau at the monitor layer (drift statistics, tokens below tau), so the monitor
    # layer must be capped: kept if the band holds it, else the band's last layer (the build's rule).
    if result.monitor_layer not in result.cap_layers:
        result.monitor_layer = result.cap_layers[-1]
    monitored = populations[ORDINARY][result.monitor_layer]
    lengths = [max(len(r["answer_ids"]), 1) for r in _load_answers(cfg) if r["kind"] == "train"]
    origin = (axis.source or str(axis.path)).split(CALIBRATED_BY)[0]  # recalibrated: the earlier note goes
    result.extra = {**axis.extra, "source": f"{origin}{CALIBRATED_BY}band {point.key} chosen for capability budget "
                    f"{cfg.capability_budget:g}",
                    # Histogram buckets and the CUSUM slack follow ordinary Assistant traffic.
                    "monitor_mean": repr(monitored.mean().item()), "monitor_std": repr(monitored.std().item()),
                    GATE_KEY: repr(answer_mean_percentile(monitored, lengths, GATE_PERCENTILE)),
                    GATED_CAP_KEY: gated_cap_thresholds(result, populations[point.population]),
                    "calibration": json.dumps(record)}
    partial = cfg.chosen.with_name(cfg.chosen.name + ".partial")
    save_axis(result, partial)
    os.replace(partial, cfg.chosen)
    return True


def count_in_character(tokenizer, score: ScoreFn | None, answers: list[dict]) -> int | None:
    """How many role-prompt answers the role scorer finds fully in role (None without a scorer)."""
    if score is None:
        return None
    roles = {r.name: r for r in persona_data.roles()}
    scores = score_answers(score, tokenizer, [a["answer_ids"] for a in answers], [roles[a["id"]] for a in answers],
                           [a["question"] for a in answers])
    return sum(s == persona_data.FULLY_IN_ROLE for s in scores)


def _front(cfg: CalibrateConfig, model, tokenizer, points: list[dict], generator_for: GeneratorFor,
           score: ScoreFn | None, compute: ComputeRunner) -> list[dict]:
    """The persona effect generating for real, for the sweep's Pareto front (the points worth
    choosing): the role prompts answered greedy with capping on, how many answers stay fully in
    character, and the answers' low tail at the monitor layer; uncapped once, as the baseline. Lines
    of ``front.jsonl`` are appended as measured, so only points not measured before run. Returns the
    baseline and the front's points, in that order."""
    path = cfg.work / "front.jsonl"
    measured = {p["point"]: p for p in map(json.loads, path.read_text().splitlines())} if path.exists() else {}
    front = sorted(pareto_front(points), key=lambda p: p["identical"])
    missing = [p for p in [{"point": UNCAPPED}, *front] if p["point"] not in measured]
    log.info("stage front: %d of %d points measured before", len(front) + 1 - len(missing), len(front) + 1)
    if missing:
        axis = load_axis(cfg.input_copy)
        populations = tau_populations(cfg)
        role_rows = [r for r in _load_answers(cfg) if r["kind"] == "role"]
        with path.open("a") as f:
            for p in tqdm(missing, desc="front (generating)", unit="point"):
                if p["point"] == UNCAPPED:
                    answers, point_ax, capping = role_rows, axis, False  # the answers stage's own
                else:
                    point_ax, capping = point_axis(axis, Point.of(p), populations), True
                    with generator_for(point_ax) as generate:
                        answers = greedy_answers(generate, role_rows, cfg.max_new_tokens, f"front {p['point']}")
                # Read at the input's monitor layer (point_axis keeps it), as the sweep's lift is.
                run = compute(lambda: teacher_forced(model, answers, point_ax, capping, batch_size=cfg.batch_size))
                measured[p["point"]] = {"point": p["point"], "n_roles": len(answers),
                                        "in_character": count_in_character(tokenizer, score, answers),
                                        "low": mean_ci(run["low"]), "mean": mean_ci(run["monitor"])}
                f.write(json.dumps(measured[p["point"]]) + "\n")
                f.flush()
    return [measured[UNCAPPED], *({**p, **measured[p["point"]]} for p in front)]


def _verify(cfg: CalibrateConfig, model, tokenizer, axes: dict[str, AssistantAxis], generator_for: GeneratorFor,
            score: ScoreFn | None, compute: ComputeRunner, path: Path) -> None:
    """Each axis generating for real (the engine, capping on) on the checked rows: validation answers
    left identical, role-play lift as the server reports it, and role answers still in character."""
    rows = [r for r in _load_answers(cfg) if r["kind"] != "train"]
    role_rows = [r for r in rows if r["kind"] == "role"]
    validation = [i for i, r in enumerate(rows) if r["kind"] == "validation"]

    result = {"n_validation": len(validation), "n_roles": len(role_rows),
              "uncapped": {"in_character": count_in_character(tokenizer, score, role_rows)}}
    for name, axis in axes.items():
        with generator_for(axis) as generate:
            answers = greedy_answers(generate, rows, cfg.max_new_tokens, f"verify ({name} axis, capped)")
        same = sum(answers[i]["answer_ids"] == rows[i]["answer_ids"] for i in validation)
        capped_roles = [a for a in answers if a["kind"] == "role"]
        before = compute(lambda: teacher_forced(model, role_rows, axis, capping=False, batch_size=cfg.batch_size))
        after = compute(lambda: teacher_forced(model, capped_roles, axis, capping=True, batch_size=cfg.batch_size))
        before, after = before["monitor"], after["monitor"]
        lift, lo, hi = mean_ci([a - b for a, b in zip(after, before)])
        result[name] = {"band": f"{axis.cap_layers[0]}:{axis.cap_layers[-1]}", "percentile": axis.percentile,
                        "identical": same / len(validation), "identical_ci": wilson(same, len(validation)),
                        "role_lift": lift, "role_lift_ci": (lo, hi),
                        "in_character": count_in_character(tokenizer, score, capped_roles)}
    path.write_text(json.dumps(result, indent=1))


def _report(cfg: CalibrateConfig, axis_in: AssistantAxis, points: list[dict], front: list[dict], folder: Path) -> None:
    rows = _load_answers(cfg)
    counts = {k: sum(r["kind"] == k for r in rows) for k in ("train", "validation", "role")}
    verify = cfg.work / "verify.json"
    write_report(folder, cfg, axis_in, load_axis(cfg.chosen), points, front, json.loads(verify.read_text()), counts)
    shutil.copyfile(verify, folder / "verify.json")


def calibrate(cfg: CalibrateConfig, model, tokenizer, generator_for: GeneratorFor, score: ScoreFn | None,
              compute: ComputeRunner = run_here) -> Path:
    """Run every stage that has not run yet and write the chosen axis to ``cfg.out`` (which may be
    the input file: the input is kept in the work folder, so a resumed run still starts from it).
    Forward passes of its own (not the engine's) run through ``compute``."""
    n_layers, hidden = len(decoder_layers(model)), model.config.get_text_config().hidden_size
    cfg.work.mkdir(parents=True, exist_ok=True)
    stage("input", cfg.input_copy, lambda p: save_axis(load_axis(cfg.axis_in, n_layers, hidden), p))
    axis_in = load_axis(cfg.input_copy, n_layers, hidden)
    sweep_points(cfg, n_layers, axis_in.monitor_layer)  # a grid with no band fails now, not after the answers

    def answers(p):
        with generator_for(None) as generate:
            _answers(cfg, generate, p)

    stage("answers", cfg.work / "answers.jsonl", answers)
    stage("projections", cfg.work / "projections.safetensors", lambda p: _projections(cfg, model, axis_in, p),
          compute)
    if PAPER in cfg.tau_populations:
        stage("role projections", cfg.work / "role_projections.safetensors",
              lambda p: _role_projections(cfg, model, axis_in, p), compute)
    points = compute(lambda: _sweep(cfg, model, axis_in))
    front = _front(cfg, model, tokenizer, points, generator_for, score, compute)
    new_choice = _choose(cfg, axis_in, points)
    chosen = load_axis(cfg.chosen)
    if new_choice or chosen.gate_detector is None:  # at the chosen monitor layer, on the uncapped answers
        chosen.extra = {**chosen.extra, DETECTOR_KEY: compute(lambda: detector_metadata(
            model, chosen, _load_answers(cfg), cfg.max_new_tokens, cfg.batch_size))}
        partial = cfg.chosen.with_name(cfg.chosen.name + ".partial")
        save_axis(chosen, partial)
        os.replace(partial, cfg.chosen)
    if new_choice:  # a new choice: what was checked and reported was another's
        (cfg.work / "verify.json").unlink(missing_ok=True)
        shutil.rmtree(cfg.report, ignore_errors=True)
    elif any(not (cfg.report / name).exists() or (cfg.report / name).read_text() != text
             for name, text in report_figures(points, front).items()):
        shutil.rmtree(cfg.report, ignore_errors=True)  # same choice, new figures (a wider grid): report again
    stage("verify", cfg.work / "verify.json", lambda p: _verify(
        cfg, model, tokenizer, {"input": axis_in, "chosen": load_axis(cfg.chosen)}, generator_for, score, compute, p))
    stage("report", cfg.report, lambda p: _report(cfg, axis_in, points, front, p))
    # A new file moved into place: a process still reading the old one (memory-mapped) keeps it.
    partial = cfg.out.with_name(cfg.out.name + ".partial")
    shutil.copyfile(cfg.chosen, partial)
    os.replace(partial, cfg.out)
    return cfg.out
