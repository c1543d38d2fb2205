"""The toolbox the axis tools share: resumable stages, and generating and scoring answers in chunks with
a progress bar. ``build``, ``calibrate`` and ``check`` are made of these."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from . import persona_data

log = logging.getLogger(__name__)

# messages per answer -> (prompt token ids, answer token ids) per answer
GenerateFn = Callable[[list[list[dict[str, str]]], float, float, int], list[tuple[list[int], list[int]]]]
# answers, their roles and questions -> role-expression scores 0..3
ScoreFn = Callable[[list[str], list[persona_data.Role], list[str]], list[int]]
# runs a stage's own forward passes and waits for them: here, or where the caller's engine decodes
# fastest (the CLI: a thread of its own, server.engines.hf.threads.in_compute_thread)
ComputeRunner = Callable[[Callable[[], object]], object]


def run_here(work: Callable[[], object]) -> object:
    return work()


def stage(name: str, path: Path, run: Callable[[Path], None], compute: ComputeRunner = run_here) -> None:
    """Run a stage unless its output exists: ``run`` writes beside ``path`` and the file is moved into place
    once complete, so an interrupted stage runs again and a finished one is never redone."""
    if path.exists():
        log.info("stage %s: %s exists, skipped", name, path.name)
        return
    log.info("stage %s", name)
    partial = path.with_name(path.name + ".partial")
    compute(lambda: run(partial))
    partial.rename(path)


def chat_messages(rows: list[dict]) -> list[list[dict[str, str]]]:
    return [([{"role": "system", "content": r["system"]}] if r["system"] else []) +
            [{"role": "user", "content": r["question"]}] for r in rows]


def generate_in_chunks(generate: GenerateFn, conversations: list[list[dict[str, str]]], temperature: float,
                       top_p: float, max_new_tokens: int, desc: str) -> list[tuple[list[int], list[int]]]:
    """``generate`` over many conversations, 64 at a time (each chunk a full batch), with a progress bar."""
    outputs, chunk = [], 64
    for start in tqdm(range(0, len(conversations), chunk), desc=desc, unit="chunk"):
        outputs += generate(conversations[start:start + chunk], temperature, top_p, max_new_tokens)
    return outputs


def greedy_answers(generate: GenerateFn, rows: list[dict], max_new_tokens: int, desc: str) -> list[dict]:
    """Each row's ``messages`` answered greedy: the row with its ``prompt_ids``, ``answer_ids`` and
    whether the answer ``ended`` (fewer tokens than allowed: end-of-sequence, a greedy choice too)."""
    answers = generate_in_chunks(generate, [r["messages"] for r in rows], 0.0, 1.0, max_new_tokens, desc)
    return [{**row, "prompt_ids": prompt_ids, "answer_ids": answer_ids, "ended": len(answer_ids) < max_new_tokens}
            for row, (prompt_ids, answer_ids) in zip(rows, answers)]


def score_answers(score: ScoreFn, tokenizer, answer_ids: list[list[int]], roles: list[persona_data.Role],
                  questions: list[str]) -> list[int]:
    """Role expression (0-3) of answers given as token ids, 64 at a time, with a progress bar."""
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in answer_ids]
    verdicts, chunk = [], 64
    for start in tqdm(range(0, len(texts), chunk), desc="score", unit="chunk"):
        part = slice(start, start + chunk)
        verdicts += score(texts[part], roles[part], questions[part])
    return verdicts
