"""Build an Assistant Axis for any model, stage by stage, resumable (stages from ``stages``).

Stages (each writes one file in the work folder; a stage whose file exists is skipped, so an
interrupted build continues where it stopped):
  generate     responses.jsonl        answers under default-Assistant conditions and role prompts
  activations  activations.safetensors mean decoder-layer output over each answer's own tokens
  score        scores.json            role expression 0-3 for every role-play answer
  axis         vectors.safetensors    role vectors (fully-in-role answers), default vector, axis
  calibrate    the axis file           tau per capped layer, capped band and monitor layer
  report       NAME.report/            persona-space PCA, held-out checks (``check``), report.md, PNG plots

Rule for the band and the monitor layer (overridable): the contiguous run of ``n_layers // 5``
layers in the second half of the model (the last two excluded) where default and in-role answers
separate most (mean Cohen's d of their projections onto the axis); the monitor layer is the band's
last layer, whose pre-cap projection already reflects the caps before it. tau at each capped layer
is the ``percentile`` of per-token projections of the default-Assistant answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from axiscap.flags import option
from axiscap.steering import AssistantAxis, record_layer_outputs, save_axis

from . import persona_data
from .stages import (ComputeRunner, GenerateFn, ScoreFn, chat_messages, generate_in_chunks, run_here, score_answers,
                     stage)


def _band(text: str) -> tuple[int, int]:
    first, last = (int(x) for x in text.split(":"))
    return first, last


@dataclass
class BuildConfig:
    """What ``axiscap axes build`` does; its flags are generated from the fields with help."""

    model_name: str
    out: Path = option(help="output axis file (.safetensors)")
    quick: bool = option(False, help="a tiny slice of every stage (tests, smoke runs)")
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = option(64, help="tokens per answer")
    # Successive prompts of a role take successive questions, so every question is used.
    questions: int = option(10, help="questions per role prompt")
    prompts_per_role: int = option(2, help="system prompts per role")
    min_in_role: int = option(3, help="fully-in-role answers a role needs to get a vector")
    percentile: float = option(25.0, help="tau: this percentile of the default answers' token projections")
    band: tuple[int, int] | None = option(None, help="capped layers FIRST:LAST (default: the documented rule)",
                                          type=_band, metavar="FIRST:LAST")
    monitor_layer: int | None = option(None, help="monitor layer (default: the band's last)")
    seed: int = 0

    def __post_init__(self):
        if self.quick:  # a tiny slice of every stage
            self.max_new_tokens, self.questions, self.prompts_per_role, self.min_in_role = 8, 2, 1, 1

    @property
    def work(self) -> Path:
        return self.out.parent / f"{self.out.stem}.build"

    @property
    def report(self) -> Path:
        return self.out.parent / f"{self.out.stem}.report"


def _conditions(cfg: BuildConfig) -> list[dict]:
    questions, roles = persona_data.questions(), persona_data.roles()
    if cfg.quick:
        questions = questions[:cfg.questions]
        roles = [next(r for r in roles if r.kind == kind) for kind in ("assistant-like", "in-between", "fantastical")]
    return persona_data.condition_rows(cfg.model_name, roles, questions, cfg.prompts_per_role, cfg.questions)


def _generate(cfg: BuildConfig, generate: GenerateFn, path: Path) -> None:
    rows = _conditions(cfg)
    outputs = generate_in_chunks(generate, chat_messages(rows), cfg.temperature, cfg.top_p, cfg.max_new_tokens,
                                 "generate")
    with path.open("w") as f:
        for row, (prompt_ids, answer_ids) in zip(rows, outputs):
            f.write(json.dumps({**row, "prompt_ids": prompt_ids, "answer_ids": answer_ids}) + "\n")


def _responses(cfg: BuildConfig) -> list[dict]:
    return [json.loads(line) for line in (cfg.work / "responses.jsonl").read_text().splitlines()]


@torch.inference_mode()
def _answer_activations(model, rows: list[dict], desc: str, per_token: bool = False, batch_size: int = 8):
    """Per answer: decoder-layer outputs over the answer's own tokens, [layers, tokens, hidden] or
    their mean [layers, hidden]; template and prompt tokens are excluded."""
    device = next(model.parameters()).device
    out = []
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch"):
        batch = rows[start:start + batch_size]
        seqs = [r["prompt_ids"] + r["answer_ids"] for r in batch]
        width = max(map(len, seqs))
        ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs], device=device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
        with record_layer_outputs(model) as store:
            model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        layers = torch.stack([store[l][0] for l in sorted(store)], dim=1).float()  # [batch, L, T, H]
        for row, r in enumerate(batch):
            n = len(r["answer_ids"])
            acts = layers[row, :, width - n:] if n else layers[row, :, width - 1:]
            out.append(acts.cpu() if per_token else acts.mean(1).cpu())
    return out


def _activations(cfg: BuildConfig, model, path: Path) -> None:
    means = _answer_activations(model, _responses(cfg), "activations")
    save_file({"means": torch.stack(means).to(torch.float16)}, str(path))


def _score(cfg: BuildConfig, tokenizer, score: ScoreFn, path: Path) -> None:
    rows = _responses(cfg)
    roles = {r.name: r for r in persona_data.roles()}
    played = [r for r in rows if r["role"] is not None]
    verdicts = iter(score_answers(score, tokenizer, [r["answer_ids"] for r in played],
                                  [roles[r["role"]] for r in played], [r["question"] for r in played]))
    path.write_text(json.dumps([None if r["role"] is None else next(verdicts) for r in rows]))


def _vectors(cfg: BuildConfig, path: Path) -> None:
    rows, scores = _responses(cfg), json.loads((cfg.work / "scores.json").read_text())
    means = load_file(str(cfg.work / "activations.safetensors"))["means"].float()
    default = means[[i for i, r in enumerate(rows) if r["role"] is None]].mean(0)
    role_vectors, names = [], []
    for name in dict.fromkeys(r["role"] for r in rows if r["role"] is not None):
        in_role = [i for i, r in enumerate(rows) if r["role"] == name and scores[i] == 3]
        if len(in_role) < cfg.min_in_role:
            continue
        role_vectors.append(means[in_role].mean(0))
        names.append(name)
    if not role_vectors:
        raise RuntimeError(f"no role had {cfg.min_in_role} fully-in-role answers; lower --min-in-role "
                           "or generate more (--questions, --prompts-per-role)")
    roles = torch.stack(role_vectors)
    save_file({"default": default, "roles": roles, "axis": default - roles.mean(0)}, str(path),
              metadata={"roles": json.dumps(names)})


def cohens_d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    pooled = ((a.var(0, correction=0) + b.var(0, correction=0)) / 2).sqrt().clamp(min=1e-6)
    return (a.mean(0) - b.mean(0)) / pooled


def choose_band(separation: torch.Tensor) -> list[int]:
    """The documented rule: the best-separating contiguous run of n_layers // 5 later layers."""
    n_layers = separation.shape[0]
    width = max(2, n_layers // 5)
    lo, hi = n_layers // 2, max(n_layers // 2 + width, n_layers - 2)
    start = max(range(lo, hi - width + 1), key=lambda s: separation[s:s + width].mean().item())
    return list(range(start, start + width))


def _calibrate(cfg: BuildConfig, model, path: Path) -> AssistantAxis:
    rows, scores = _responses(cfg), json.loads((cfg.work / "scores.json").read_text())
    vectors = load_file(str(cfg.work / "vectors.safetensors"))
    with safe_open(str(cfg.work / "vectors.safetensors"), framework="pt") as f:
        role_names = json.loads(f.metadata()["roles"])
    axis = vectors["axis"]
    unit = axis / axis.norm(dim=-1, keepdim=True)
    means = load_file(str(cfg.work / "activations.safetensors"))["means"].float()
    default_idx = [i for i, r in enumerate(rows) if r["role"] is None]
    in_role_idx = [i for i, s in enumerate(scores) if s == persona_data.FULLY_IN_ROLE]
    separation = cohens_d((means[default_idx] * unit).sum(-1), (means[in_role_idx] * unit).sum(-1))
    band = list(range(cfg.band[0], cfg.band[1] + 1)) if cfg.band else choose_band(separation)
    monitor = cfg.monitor_layer if cfg.monitor_layer is not None else band[-1]

    tokens = _answer_activations(model, [rows[i] for i in default_idx], "calibrate", per_token=True)
    projections = torch.cat([(t * unit.unsqueeze(1)).sum(-1) for t in tokens], dim=1)  # [L, tokens]
    q = cfg.percentile / 100
    result = AssistantAxis(
        axis=axis, cap_layers=band, cap_thresholds=[torch.quantile(projections[l], q).item() for l in band],
        monitor_layer=monitor, model=cfg.model_name, percentile=cfg.percentile, n_samples=projections.shape[1],
        extra={
            "source": f"axiscap axes build: {len(default_idx)} default answers, {len(role_names)} role vectors",
            "monitor_mean": repr(projections[monitor].mean().item()),
            "monitor_std": repr(projections[monitor].std().item()),
            "separation_d": ",".join(f"{x:.3f}" for x in separation.tolist()),
        },
    )
    save_axis(result, path)
    return result


def _report(cfg: BuildConfig, model, tokenizer, generate: GenerateFn, score: ScoreFn, folder: Path) -> None:
    from collections import Counter

    from axiscap.steering import load_axis

    from .check import check_answers
    from .build_report import NEUTRAL_PROMPTS, held_out_checks, persona_space, write_report

    axis = load_axis(cfg.out)
    held = check_answers(cfg.model_name, generate, score, tokenizer, cfg.temperature, cfg.top_p, cfg.max_new_tokens,
                         cfg.quick)
    neutral = [p for p, _ in generate([[{"role": "user", "content": q}] for q in NEUTRAL_PROMPTS], 0.0, 1.0, 1)]
    checks = held_out_checks(model, tokenizer, axis, held, neutral, max_new_tokens=cfg.max_new_tokens // 2)
    rows, scores = _responses(cfg), json.loads((cfg.work / "scores.json").read_text())
    space = persona_space(cfg.work / "vectors.safetensors", axis.monitor_layer)
    played = dict.fromkeys(r["role"] for r in rows if r["role"] is not None)
    counts = {"default": sum(r["role"] is None for r in rows), "roleplay": sum(r["role"] is not None for r in rows),
              "scores": dict(sorted(Counter(s for s in scores if s is not None).items())),
              "skipped": [name for name in played if name not in space["names"]]}
    write_report(folder, axis, space, checks, counts)


def build(cfg: BuildConfig, model, tokenizer, generate: GenerateFn, score: ScoreFn,
          compute: ComputeRunner = run_here) -> Path:
    """Run every stage that has not run yet; returns the axis file. The stages that run forward
    passes of their own run through ``compute``."""
    torch.manual_seed(cfg.seed)
    cfg.work.mkdir(parents=True, exist_ok=True)
    stage("generate", cfg.work / "responses.jsonl", lambda p: _generate(cfg, generate, p))
    stage("activations", cfg.work / "activations.safetensors", lambda p: _activations(cfg, model, p), compute)
    stage("score", cfg.work / "scores.json", lambda p: _score(cfg, tokenizer, score, p), compute)
    stage("axis", cfg.work / "vectors.safetensors", lambda p: _vectors(cfg, p))
    stage("calibrate", cfg.out, lambda p: _calibrate(cfg, model, p), compute)
    stage("report", cfg.report, lambda p: _report(cfg, model, tokenizer, generate, score, p), compute)
    return cfg.out
