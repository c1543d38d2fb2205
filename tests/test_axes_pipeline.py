"""`axiscap axes build`: every stage on the real SmolLM2 (--quick), resuming, and the band rule."""

from __future__ import annotations

import subprocess
import sys

import torch

from axiscap.axes.pipeline import choose_band
from axiscap.steering import load_axis


def build(out, *flags):
    return subprocess.run([sys.executable, "-m", "axiscap.cli", "axes", "build", "--quick", "--device", "cpu",
                           "--out", str(out), *flags], capture_output=True, text=True, timeout=600)


def test_quick_build_runs_every_stage_then_resumes(smollm2, tmp_path):  # smollm2: model cached first
    out = tmp_path / "smol.safetensors"
    first = build(out)
    assert first.returncode == 0, first.stderr[-3000:]
    for stage in ("generate", "activations", "score", "axis", "calibrate"):
        assert f"stage {stage}\n" in first.stderr
    work = tmp_path / "smol.build"
    assert {p.name for p in work.iterdir()} == {"responses.jsonl", "activations.safetensors", "scores.json",
                                                 "vectors.safetensors"}
    axis = load_axis(out, n_layers=30, hidden_size=576)
    assert axis.model == "smollm2-135m-instruct" and axis.monitor_layer == axis.cap_layers[-1]
    assert axis.cap_layers == list(range(axis.cap_layers[0], axis.cap_layers[0] + 6)) and axis.cap_layers[0] >= 15
    assert axis.percentile == 25.0 and axis.n_samples > 0

    # An interrupted build: the last stages' outputs are gone; only they run again.
    (work / "vectors.safetensors").unlink()
    out.unlink()
    again = build(out, "--band", "10:12", "--monitor-layer", "11")
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("generate", "activations", "score"):
        assert f"stage {stage}: " in again.stderr and "exists, skipped" in again.stderr
    assert "stage axis\n" in again.stderr and "stage calibrate\n" in again.stderr
    rebuilt = load_axis(out, n_layers=30, hidden_size=576)
    assert rebuilt.cap_layers == [10, 11, 12] and rebuilt.monitor_layer == 11
    torch.testing.assert_close(rebuilt.axis, axis.axis)


def test_band_rule_takes_the_best_separating_later_layers():
    separation = torch.zeros(30)
    separation[21:27] = 5.0
    separation[3] = 9.0  # early layers are never chosen
    assert choose_band(separation) == [21, 22, 23, 24, 25, 26]
