"""Convert the paper's published axes (``lu-christina/assistant-axis-vectors``) to an axis file.

Their layout:
  ``assistant_axis.pt``   raw tensor ``[n_layers, hidden]`` pointing toward the Assistant.
  ``capping_config.pt``   ``{'vectors': {name: {'vector': Tensor[hidden], 'layer': int}},
                             'experiments': [{'id': str, 'interventions': [{'vector': name, 'cap': float}]}]}``
Their capping vectors point toward role-play (role - default) and ``cap`` is a *ceiling* on the
projection onto the unit vector u. A ceiling ``<h, u> <= cap`` is the floor ``<h, -u> >= -cap``,
so a capped layer gets the axis ``-u`` and the threshold ``-cap`` here.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from axiscap.steering import AssistantAxis

log = logging.getLogger(__name__)


class PaperFormatError(ValueError):
    pass


def _load(path: str | Path):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a bad pickle
        raise PaperFormatError(f"{path}: cannot be read with torch.load ({exc})") from None


def experiment_ids(config_path: str | Path) -> list[str]:
    return [e["id"] for e in _load(config_path).get("experiments", [])]


def import_paper_axis(
    axis_path: str | Path,
    config_path: str | Path,
    experiment_id: str,
    model: str,
    monitor_layer: int | None = None,
) -> AssistantAxis:
    axis = _load(axis_path)
    if not isinstance(axis, torch.Tensor) or axis.ndim != 2:
        raise PaperFormatError(f"{axis_path}: expected a [n_layers, hidden] tensor, got {type(axis).__name__}"
                               f"{list(axis.shape) if isinstance(axis, torch.Tensor) else ''}")
    config = _load(config_path)
    if not isinstance(config, dict) or "vectors" not in config or "experiments" not in config:
        raise PaperFormatError(f"{config_path}: expected a dict with 'vectors' and 'experiments'")
    experiments = {e["id"]: e for e in config["experiments"]}
    if experiment_id not in experiments:
        raise PaperFormatError(
            f"{config_path}: no experiment {experiment_id!r}; it has {sorted(experiments)}"
        )

    out = axis.detach().float().clone()
    cap_layers: list[int] = []
    thresholds: list[float] = []
    for intervention in experiments[experiment_id]["interventions"]:
        name = intervention["vector"]
        if name not in config["vectors"]:
            raise PaperFormatError(f"{config_path}: experiment names vector {name!r}, which is not in 'vectors'")
        entry = config["vectors"][name]
        layer, role_dir = int(entry["layer"]), entry["vector"].detach().float()
        if not 0 <= layer < out.shape[0]:
            raise PaperFormatError(f"{config_path}: vector {name!r} is at layer {layer}, outside the axis")
        assistant_dir = -role_dir / role_dir.norm()
        agreement = torch.nn.functional.cosine_similarity(assistant_dir, out[layer], dim=0).item()
        if agreement < 0:
            log.warning("layer %d: the capping vector and assistant_axis.pt disagree in sign (cos %.2f)",
                        layer, agreement)
        out[layer] = assistant_dir
        cap_layers.append(layer)
        thresholds.append(-float(intervention["cap"]))

    if not cap_layers:
        raise PaperFormatError(f"{config_path}: experiment {experiment_id!r} has no interventions")
    percentile = _percentile_from_id(experiment_id)
    return AssistantAxis(
        axis=out,
        cap_layers=cap_layers,
        cap_thresholds=thresholds,
        monitor_layer=cap_layers[len(cap_layers) // 2] if monitor_layer is None else monitor_layer,
        model=model,
        percentile=percentile,
        n_samples=0,  # the published config does not say
        extra={"source": f"assistant-axis-vectors experiment {experiment_id}"},
    )


def _percentile_from_id(experiment_id: str) -> float:
    # Their ids end in "-p0.25" for the 25th percentile.
    match = re.search(r"-p([0-9.]+)$", experiment_id)
    return float(match.group(1)) * 100 if match else float("nan")
