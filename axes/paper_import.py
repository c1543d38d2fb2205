"""Convert the paper's published axes (``lu-christina/assistant-axis-vectors``) to an axis file.

Their layout:
  ``assistant_axis.pt``   raw tensor ``[n_layers, hidden]`` pointing toward the Assistant.
  ``capping_config.pt``   ``{'vectors': {name: {'vector': Tensor[hidden], 'layer': int}},
                             'experiments': [{'id': str, 'interventions': [{'vector': name, 'cap': float}]}]}``
We accept what the paper's own loaders accept: the axis also as ``{'axis': tensor}``, numbers in the
config as numpy scalars, an experiment by index as well as by id, and interventions without ``cap``
(not capping ones: skipped).
Their capping vectors point toward role-play (role - default) and ``cap`` is a *ceiling* on the
projection onto the unit vector u. A ceiling ``<h, u> <= cap`` is the floor ``<h, -u> >= -cap``,
so a capped layer gets the axis ``-u`` and the threshold ``-cap`` here.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch

from axiscap.steering import AssistantAxis

log = logging.getLogger(__name__)

# The paper's README names the layer its figures project onto ("target layer") for the models whose
# axes it publishes; monitoring the same layer keeps our projections comparable with its plots.
PAPER_TARGET_LAYERS = {
    "google/gemma-2-27b-it": 22,
    "Qwen/Qwen3-32B": 32,
    "meta-llama/Llama-3.3-70B-Instruct": 40,
}

# The paper loads with weights_only=False (any pickle runs code). We stay with the safe unpickler and
# allow only numpy's scalar and array reconstruction, which their configs' numbers may need.
_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 / 1
_NUMPY_GLOBALS = [np.ndarray, np.dtype, _multiarray.scalar, _multiarray._reconstruct,
                  *(getattr(np.dtypes, name) for name in np.dtypes.__all__)]


class PaperFormatError(ValueError):
    pass


def _load(path: str | Path):
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a bad pickle
        raise PaperFormatError(f"{path}: cannot be read with torch.load ({exc})") from None


def _experiment(config: dict, config_path, experiment: str | int) -> dict:
    """By id, or by index as the paper's ``build_capping_steerer`` also allows."""
    experiments = config["experiments"]
    ids = [e.get("id") for e in experiments]
    if isinstance(experiment, int) or (isinstance(experiment, str) and experiment.isdigit()
                                       and experiment not in ids):
        index = int(experiment)
        if not 0 <= index < len(experiments):
            raise PaperFormatError(f"{config_path}: no experiment at index {index}; it has {len(experiments)}")
        return experiments[index]
    if experiment not in ids:
        raise PaperFormatError(f"{config_path}: no experiment {experiment!r}; it has {sorted(map(str, ids))}")
    return experiments[ids.index(experiment)]


def import_paper_axis(
    axis_path: str | Path,
    config_path: str | Path,
    experiment_id: str | int,
    model: str,
    monitor_layer: int | None = None,
) -> AssistantAxis:
    axis = _load(axis_path)
    if isinstance(axis, dict) and "axis" in axis:  # the paper's save_axis may wrap it
        axis = axis["axis"]
    if not isinstance(axis, torch.Tensor) or axis.ndim != 2:
        raise PaperFormatError(f"{axis_path}: expected a [n_layers, hidden] tensor, got {type(axis).__name__}"
                               f"{list(axis.shape) if isinstance(axis, torch.Tensor) else ''}")
    config = _load(config_path)
    if not isinstance(config, dict) or "vectors" not in config or "experiments" not in config:
        raise PaperFormatError(f"{config_path}: expected a dict with 'vectors' and 'experiments'")
    experiment = _experiment(config, config_path, experiment_id)
    experiment_id = str(experiment.get("id", experiment_id))

    out = axis.detach().float().clone()
    cap_layers: list[int] = []
    thresholds: list[float] = []
    for intervention in experiment["interventions"]:
        name = intervention["vector"]
        if "cap" not in intervention:
            log.warning("experiment %s: intervention on %r has no 'cap' (not a capping one); skipped",
                        experiment_id, name)
            continue
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
        raise PaperFormatError(f"{config_path}: experiment {experiment_id!r} has no capping interventions")
    if monitor_layer is None:
        monitor_layer = config.get("target_layer", PAPER_TARGET_LAYERS.get(model))
    if monitor_layer is None:
        monitor_layer = cap_layers[len(cap_layers) // 2]
    percentile = _percentile_from_id(experiment_id)
    return AssistantAxis(
        axis=out,
        cap_layers=cap_layers,
        cap_thresholds=thresholds,
        monitor_layer=int(monitor_layer),
        model=model,
        percentile=percentile,
        n_samples=0,  # the published config does not say
        extra={"source": f"assistant-axis-vectors experiment {experiment_id}"},
    )


def _percentile_from_id(experiment_id: str) -> float:
    # Their ids end in "-p0.25" for the 25th percentile.
    match = re.search(r"-p([0-9.]+)$", experiment_id)
    return float(match.group(1)) * 100 if match else float("nan")
