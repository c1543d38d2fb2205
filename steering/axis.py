"""The axis file: per-layer Assistant Axis and the cap thresholds of the capped band.

One safetensors file per model:

tensors
  ``axis``            float32 ``[n_layers, hidden]``  points from role-play toward the Assistant
                      (stored as built, not normalised; capping and monitoring use ``axis[l]/|axis[l]|``)
  ``cap_layers``      int64   ``[k]``                 decoder layers that are capped
  ``cap_thresholds``  float32 ``[k]``                 tau for each capped layer, in units of the
                      projection onto the unit axis: capping keeps ``<h, v> >= tau``
metadata (all strings, as safetensors requires)
  ``format``          ``axiscap-axis/1``
  ``model``           the model the axis was built for
  ``monitor_layer``   layer whose projection is exported as a metric
  ``percentile``      percentile of default-Assistant projections that set tau
  ``n_samples``       how many samples calibrated tau
  optional            the keys of ``OPTIONAL_METADATA`` (how it was made, monitor statistics, the gate
                      threshold, the calibration record, per-layer separation), each read through the
                      ``AssistantAxis`` property of the same name and checked at load

tau at the monitor layer has one name, ``AssistantAxis.monitor_tau`` (None where the monitor layer
sits outside the capped band).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

FORMAT = "axiscap-axis/1"
REQUIRED_METADATA = ("format", "model", "monitor_layer", "percentile", "n_samples")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _detector(text: str) -> dict:
    value = _json_object(text)
    if not (isinstance(value.get("threshold"), (int, float)) and isinstance(value.get("ewma_lambda"), (int, float))
            and 0 < value["ewma_lambda"] <= 1 and isinstance(value.get("warmup"), int) and value["warmup"] >= 0):
        raise ValueError("needs a number 'threshold', an 'ewma_lambda' in (0, 1] and a whole 'warmup' >= 0")
    return value


# Optional metadata: key -> (how its string is read, what it holds). Written by ``axes build`` and
# ``axes calibrate``; a value its reader refuses makes the file fail at load, naming the key.
OPTIONAL_METADATA = {
    "source": (str, "how the file was made"),
    "monitor_mean": (float, "mean projection of default-Assistant answer tokens at the monitor layer "
                            "(places the projection histogram's buckets)"),
    "monitor_std": (float, "their standard deviation"),
    "gate_threshold": (float, "gated capping: a system or assistant message whose mean projection at the "
                              "monitor layer is below it has drifted"),
    "gate_calibration": (_json_object, "how the gate threshold was measured: percentile and answers (JSON)"),
    "gate_detector": (_detector, "gated capping's token detector: an EWMA of the answer's token projections "
                                 "(ewma_lambda), tested after warmup tokens against threshold, and how it was "
                                 "calibrated (JSON)"),
    "gated_cap_thresholds": (_floats, "gated capping: tau per capped layer once a request's gate trips, a cap of "
                                      "its own on the same band, stronger than always-on's (comma-separated; "
                                      "without it a tripped request gets the always-on cap)"),
    "calibration": (_json_object, "axes calibrate's record of the chosen band and tau (JSON)"),
    "separation_d": (_floats, "per layer, Cohen's d between default and role answers (comma-separated)"),
}


class AxisFileError(ValueError):
    """An axis file that cannot be used; the message names the file and what is wrong."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = str(path) if path is not None else "<in memory>"
        self.problem = problem
        super().__init__(f"axis file {self.path}: {problem}")


@dataclass
class AssistantAxis:
    axis: torch.Tensor  # [n_layers, hidden], float32
    cap_layers: list[int]
    cap_thresholds: list[float]
    monitor_layer: int
    model: str
    percentile: float
    n_samples: int
    extra: dict[str, str] = field(default_factory=dict)
    path: str | None = None

    @property
    def n_layers(self) -> int:
        return self.axis.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.axis.shape[1]

    def unit(self, layer: int) -> torch.Tensor:
        v = self.axis[layer].float()
        return v / v.norm()

    def threshold(self, layer: int) -> float | None:
        if layer in self.cap_layers:
            return self.cap_thresholds[self.cap_layers.index(layer)]
        return None

    @property
    def monitor_tau(self) -> float | None:
        """tau at the monitor layer: what the metrics, the gate and the drift figures compare against."""
        return self.threshold(self.monitor_layer)

    def _optional(self, key: str):
        value = self.extra.get(key)
        return None if value is None else OPTIONAL_METADATA[key][0](value)

    @property
    def source(self) -> str | None:
        return self._optional("source")

    @property
    def monitor_mean(self) -> float | None:
        return self._optional("monitor_mean")

    @property
    def monitor_std(self) -> float | None:
        return self._optional("monitor_std")

    @property
    def gate_threshold(self) -> float | None:
        return self._optional("gate_threshold")

    @property
    def gate_calibration(self) -> dict | None:
        return self._optional("gate_calibration")

    @property
    def gate_detector(self) -> dict | None:
        return self._optional("gate_detector")

    @property
    def gated_cap_thresholds(self) -> list[float] | None:
        return self._optional("gated_cap_thresholds")

    @property
    def calibration(self) -> dict | None:
        return self._optional("calibration")

    @property
    def separation_d(self) -> list[float] | None:
        return self._optional("separation_d")

    def validate(self, n_layers: int | None = None, hidden_size: int | None = None) -> None:
        """Raise AxisFileError naming the first mismatch with the model or inside the file."""
        err = lambda problem: AxisFileError(self.path, problem)  # noqa: E731
        if self.axis.ndim != 2:
            raise err(f"'axis' must be [n_layers, hidden], got shape {list(self.axis.shape)}")
        if n_layers is not None and self.n_layers != n_layers:
            raise err(f"axis has {self.n_layers} layers but the model has {n_layers}")
        if hidden_size is not None and self.hidden_size != hidden_size:
            raise err(f"axis hidden size is {self.hidden_size} but the model's is {hidden_size}")
        if not torch.isfinite(self.axis).all():
            bad = sorted({int(i) for i in (~torch.isfinite(self.axis)).nonzero()[:, 0]})
            raise err(f"axis has non-finite values in layers {bad}")
        if len(self.cap_thresholds) != len(self.cap_layers):
            raise err(
                f"{len(self.cap_layers)} capped layers but {len(self.cap_thresholds)} thresholds: "
                "every capped layer needs a threshold"
            )
        if len(set(self.cap_layers)) != len(self.cap_layers):
            raise err(f"capped layers repeat: {self.cap_layers}")
        for layer in [*self.cap_layers, self.monitor_layer]:
            if not 0 <= layer < self.n_layers:
                raise err(f"layer {layer} is outside 0..{self.n_layers - 1}")
            if float(self.axis[layer].norm()) == 0.0:
                raise err(f"axis of layer {layer} is all zeros, so it has no direction")
        bad_tau = [l for l, t in zip(self.cap_layers, self.cap_thresholds) if not math.isfinite(t)]
        if bad_tau:
            raise err(f"thresholds of layers {bad_tau} are not finite")
        for key, (read, meaning) in OPTIONAL_METADATA.items():
            if key in self.extra:
                try:
                    read(self.extra[key])
                except ValueError:
                    raise err(f"metadata {key!r} ({meaning}) cannot be read: {self.extra[key][:80]!r}") from None
        gated = self.gated_cap_thresholds
        if gated is not None and (len(gated) != len(self.cap_layers) or not all(map(math.isfinite, gated))):
            raise err(f"metadata 'gated_cap_thresholds' needs one finite tau per capped layer "
                      f"({len(self.cap_layers)}), got {gated}")


def save_axis(axis: AssistantAxis, path: str | Path) -> None:
    axis.validate()
    metadata = {
        **axis.extra,
        "format": FORMAT,
        "model": axis.model,
        "monitor_layer": str(axis.monitor_layer),
        "percentile": repr(float(axis.percentile)),
        "n_samples": str(int(axis.n_samples)),
    }
    tensors = {
        "axis": axis.axis.detach().float().contiguous().cpu(),
        "cap_layers": torch.tensor(axis.cap_layers, dtype=torch.int64),
        "cap_thresholds": torch.tensor(axis.cap_thresholds, dtype=torch.float32),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def load_axis(path: str | Path, n_layers: int | None = None, hidden_size: int | None = None) -> AssistantAxis:
    """Load and validate an axis file; pass the model's shape to check it against the model."""
    path = Path(path)
    if not path.is_file():
        raise AxisFileError(path, "no such file")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise AxisFileError(path, f"not a readable safetensors file ({exc})") from None

    missing = [k for k in ("axis", "cap_layers", "cap_thresholds") if k not in tensors]
    if missing:
        raise AxisFileError(path, f"missing tensors {missing}; found {sorted(tensors)}")
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise AxisFileError(path, f"missing metadata {missing}")
    if metadata["format"] != FORMAT:
        raise AxisFileError(path, f"format is {metadata['format']!r}, expected {FORMAT!r}")
    try:
        monitor_layer = int(metadata["monitor_layer"])
        percentile = float(metadata["percentile"])
        n_samples = int(metadata["n_samples"])
    except ValueError as exc:
        raise AxisFileError(path, f"bad metadata value ({exc})") from None
    if tensors["cap_layers"].ndim != 1 or tensors["cap_thresholds"].ndim != 1:
        raise AxisFileError(path, "'cap_layers' and 'cap_thresholds' must be 1-D")

    axis = AssistantAxis(
        axis=tensors["axis"].float(),
        cap_layers=[int(x) for x in tensors["cap_layers"].tolist()],
        cap_thresholds=[float(x) for x in tensors["cap_thresholds"].tolist()],
        monitor_layer=monitor_layer,
        model=metadata["model"],
        percentile=percentile,
        n_samples=n_samples,
        extra={k: v for k, v in metadata.items() if k not in REQUIRED_METADATA},
        path=str(path),
    )
    axis.validate(n_layers, hidden_size)
    return axis
