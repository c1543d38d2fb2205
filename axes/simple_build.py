"""A first, small axis builder: default-Assistant answers versus role-play answers.

1. Answer a few questions (``data/questions.json``) under the default-Assistant conditions and
   under the fantastical roles' system prompts (``data/roles.json``).
2. Per answer and layer, average the decoder layer's output over the answer's tokens.
3. axis[l] = mean(default answers)[l] - mean(role-play answers)[l].
4. Choose the capped band: the contiguous run of middle-to-late layers where the two groups
   separate most (Cohen's d of per-answer projections); monitor the band's last layer, whose
   pre-cap projection already reflects the caps of the layers before it.
5. tau[l] = the chosen percentile of per-token projections of default answers at layer l.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from axiscap.steering import AssistantAxis, record_layer_outputs, save_axis

from . import persona_data

log = logging.getLogger(__name__)

# The first build uses a slice of the persona data: the first questions, and the first prompt of
# every fantastical role except the oracle, which stays out for held-out checks.
N_QUESTIONS = 10
HELD_OUT_ROLES = ("oracle",)


def _role_prompts() -> list[str]:
    return [r.system_prompts[0] for r in persona_data.roles()
            if r.kind == "fantastical" and r.name not in HELD_OUT_ROLES]


def _chat_ids(tokenizer, system: str | None, question: str) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def _answer_activations(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                        desc: str) -> list[torch.Tensor]:
    """For each prompt, generate an answer and return its per-token activations [layers, tokens, hidden]."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[torch.Tensor] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        batch = prompts[start:start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=pad)
        answers = generated[:, width:]
        full_mask = torch.cat([mask, torch.ones_like(answers)], dim=1)
        # Stop each answer at its first end-of-sequence token.
        ends = {pad, tokenizer.eos_token_id}
        for row, answer in enumerate(answers.tolist()):
            end = next((i for i, t in enumerate(answer) if t in ends), None)
            if end is not None:
                full_mask[row, width + end:] = 0
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        with record_layer_outputs(model) as store:
            model(input_ids=generated, attention_mask=full_mask, position_ids=positions)
        layers = torch.stack([store[l][0] for l in sorted(store)], dim=1).float()  # [batch, L, T, H]
        for row in range(len(batch)):
            keep = full_mask[row, width:].bool()
            out.append(layers[row, :, width:][:, keep].cpu())
    return out


def _cohens_d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    pooled = ((a.var(0) + b.var(0)) / 2).sqrt().clamp(min=1e-6)
    return (a.mean(0) - b.mean(0)) / pooled


def build_simple_axis(model, tokenizer, model_name: str, out: str | Path, percentile: float = 25.0,
                      max_new_tokens: int = 48, batch_size: int = 8) -> AssistantAxis:
    questions = persona_data.questions()[:N_QUESTIONS]
    default_prompts = [_chat_ids(tokenizer, s, q) for s in persona_data.default_conditions(model_name)
                       for q in questions]
    role_prompts = [_chat_ids(tokenizer, s, q) for s in _role_prompts() for q in questions]
    default_acts = _answer_activations(model, tokenizer, default_prompts, max_new_tokens, batch_size, "default answers")
    role_acts = _answer_activations(model, tokenizer, role_prompts, max_new_tokens, batch_size, "role-play answers")
    default_acts = [a for a in default_acts if a.shape[1]]
    role_acts = [a for a in role_acts if a.shape[1]]

    default_means = torch.stack([a.mean(1) for a in default_acts])  # [n, L, H]
    role_means = torch.stack([a.mean(1) for a in role_acts])
    axis = default_means.mean(0) - role_means.mean(0)  # [L, H]
    unit = axis / axis.norm(dim=-1, keepdim=True)

    d = _cohens_d((default_means * unit).sum(-1), (role_means * unit).sum(-1))  # [L]
    n_layers = axis.shape[0]
    width = max(2, n_layers // 5)
    lo, hi = n_layers // 2, n_layers - 2  # middle-to-late layers, leaving the last ones alone
    start = max(range(lo, hi - width + 1), key=lambda s: d[s:s + width].mean().item())
    band = list(range(start, start + width))
    monitor = band[-1]

    default_tokens = torch.cat([a for a in default_acts], dim=1)  # [L, tokens, H]
    token_proj = (default_tokens * unit.unsqueeze(1)).sum(-1)  # [L, tokens]
    q = percentile / 100
    thresholds = [torch.quantile(token_proj[l], q).item() for l in band]
    log.info("separation (Cohen's d) by layer: %s", [round(x, 2) for x in d.tolist()])
    log.info("capped band %s, monitor layer %d, thresholds %s", band, monitor, [round(t, 3) for t in thresholds])

    result = AssistantAxis(
        axis=axis, cap_layers=band, cap_thresholds=thresholds, monitor_layer=monitor, model=model_name,
        percentile=percentile, n_samples=token_proj.shape[1],
        extra={
            "source": f"axiscap axes build-simple: {len(default_acts)} default and {len(role_acts)} role-play answers",
            "monitor_mean": repr(token_proj[monitor].mean().item()),
            "monitor_std": repr(token_proj[monitor].std().item()),
            "separation_d": ",".join(f"{x:.3f}" for x in d.tolist()),
        },
    )
    save_axis(result, out)
    return result
