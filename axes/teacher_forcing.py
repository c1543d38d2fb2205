"""Teacher forcing: each prompt + answer run once through the model, capped or not, and what the axis
tools read off it (greedy choices, NLL, monitor projections)."""

from __future__ import annotations

import torch
from tqdm import tqdm

from axiscap.steering import AssistantAxis, AxisHooks, record_layer_outputs

from .calibration_report import LOW_PERCENTILE


@torch.inference_mode()
def teacher_forced(model, rows: list[dict], axis: AssistantAxis, capping: bool, batch_size: int = 8,
                   layers: list[int] | None = None, desc: str | None = None) -> dict:
    """Run each prompt + answer once, every position capped by ``axis`` or none. Per row: the greedy
    choices along the answer (and after it, where it ended), the answer's summed NLL, and the mean and
    the LOW_PERCENTILE-th percentile of the monitor-layer projection over the answer (before that
    layer's own cap, as the server reports it); with ``layers``, also every answer token's projection
    onto each of those layers' axis. ``served``: each answer token's monitor projection as the server
    reports it, at the position that produced the token (the first at the prompt's last position).
    ``desc``: show a progress bar under that name (a stage's own pass; a sweep's per-point passes have none)."""
    device = next(model.parameters()).device
    hooks = AxisHooks(model, axis)
    hooks.set_cap_mask(torch.ones(1, 1, dtype=torch.bool, device=device) if capping else None)
    units = torch.stack([axis.unit(l) for l in layers]).to(device) if layers else None
    choices, nll, monitor, low, per_layer, served = [], [], [], [], [], []
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", disable=desc is None):
            batch = rows[start:start + batch_size]
            seqs = [r["prompt_ids"] + r["answer_ids"] for r in batch]
            width = max(map(len, seqs))
            ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs], device=device)
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
            with record_layer_outputs(model, layers or []) as store:
                logits = model(input_ids=ids, attention_mask=mask,
                               position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.float()
            for row, r in enumerate(batch):
                n = len(r["answer_ids"])
                steps = logits[row, width - n - 1:width - (0 if r["ended"] else 1)]  # position i chooses token i
                choices.append(steps.argmax(-1).tolist())
                target = torch.tensor(r["answer_ids"], device=device, dtype=torch.long)
                nll.append((torch.logsumexp(steps[:n], -1) - steps[:n].gather(-1, target[:, None])[:, 0]).sum().item())
                span = slice(width - max(n, 1), width)
                answer = hooks.monitor_projection[row, span].float()
                monitor.append(answer.mean().item())
                served.append(hooks.monitor_projection[row, width - n - 1:width - 1].float().tolist())
                low.append(torch.quantile(answer, LOW_PERCENTILE / 100).item())
                if layers:
                    h = torch.stack([store[l][0][row, span].float() for l in layers])  # [layers, tokens, hidden]
                    per_layer.append((h * units[:, None]).sum(-1).cpu())
    finally:
        hooks.remove()
    return {"choices": choices, "nll": nll, "monitor": monitor, "low": low, "per_layer": per_layer, "served": served}
