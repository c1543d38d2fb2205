"""`axiscap axes build`: every stage on the real SmolLM2 (--quick), resuming, and the band rule."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from axiscap.axes.build import choose_band
from axiscap.axes.stats import roc_auc
from axiscap.steering import load_axis

from .conftest import REPO


def build(out, *flags):
    return subprocess.run([sys.executable, "-m", "axiscap.cli", "axes", "build", "--quick", "--device", "cpu",
                           "--out", str(out), *flags], capture_output=True, text=True, timeout=600)


def test_quick_build_runs_every_stage_then_resumes(smollm2, tmp_path):  # smollm2: model cached first
    out = tmp_path / "smol.safetensors"
    first = build(out)
    assert first.returncode == 0, first.stderr[-3000:]
    for stage in ("generate", "activations", "score", "axis", "calibrate", "report"):
        assert f"stage {stage}\n" in first.stderr
    work = tmp_path / "smol.build"
    assert {p.name for p in work.iterdir()} == {"responses.jsonl", "activations.safetensors", "scores.json",
                                                 "vectors.safetensors"}
    report = tmp_path / "smol.report"
    assert {p.name for p in report.iterdir()} == {"report.md", "checks.json", "persona_space.png", "separation.png",
                                                   "projections.png", "capping.png"}
    checks = json.loads((report / "checks.json").read_text())
    # --quick: one check role's answer to one check question, against the 5 default conditions' answers
    assert checks["n_default"] == 5 and checks["all_roleplay"]["n"] == 1 and checks["n_roles"] == 1
    # One role answer against five default ones: the AUC is the share of defaults whose mean projection lies
    # above the role answer's (ties half), from the very projections the report lists.
    default, played = checks["default_projections"], checks["roleplay_projections"]
    assert len(default) == 5 and len(played) == 1
    above = sum((d > p) + 0.5 * (d == p) for d in default for p in played) / 5
    assert checks["all_roleplay"]["auc"] == pytest.approx(above)
    assert checks["default_mean"] == pytest.approx(sum(default) / 5)
    assert checks["fully_in_role"]["n"] <= 1
    assert 0 < checks["greedy_tokens_identical"] <= checks["greedy_tokens"]
    assert "## Held-out checks" in (report / "report.md").read_text()
    axis = load_axis(out, n_layers=30, hidden_size=576)
    assert axis.model == "smollm2-135m-instruct" and axis.monitor_layer == axis.cap_layers[-1]
    assert axis.cap_layers == list(range(axis.cap_layers[0], axis.cap_layers[0] + 6)) and axis.cap_layers[0] >= 15
    assert axis.percentile == 25.0 and axis.n_samples > 0

    # An interrupted build: the last stages' outputs are gone; only they run again.
    (work / "vectors.safetensors").unlink()
    out.unlink()
    shutil.rmtree(report)
    again = build(out, "--band", "10:12", "--monitor-layer", "11")
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("generate", "activations", "score"):
        assert f"stage {stage}: " in again.stderr and "exists, skipped" in again.stderr
    assert "stage axis\n" in again.stderr and "stage calibrate\n" in again.stderr and "stage report\n" in again.stderr
    rebuilt = load_axis(out, n_layers=30, hidden_size=576)
    assert rebuilt.cap_layers == [10, 11, 12] and rebuilt.monitor_layer == 11
    torch.testing.assert_close(rebuilt.axis, axis.axis)


def test_band_rule_takes_the_best_separating_later_layers():
    separation = torch.zeros(30)
    separation[21:27] = 5.0
    separation[3] = 9.0  # early layers are never chosen
    assert choose_band(separation) == [21, 22, 23, 24, 25, 26]


def test_roc_auc():
    assert roc_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert roc_auc([1.0], [2.0]) == 0.0
    assert roc_auc([1.0, 3.0], [2.0, 2.0]) == 0.5


def test_shipped_report_shows_the_held_out_checks_pass():
    checks = json.loads((REPO / "axes" / "smollm2-135m-instruct.report" / "checks.json").read_text())
    assert checks["auc_default_vs_roleplay"] >= 0.9
    assert checks["roleplay_mean_capped"] > checks["roleplay_mean_uncapped"]
    assert checks["perplexity_capped"] < 1.25 * checks["perplexity_uncapped"]
