"""`axiscap axes dose-response`: additive steering along the axis, and the figures read off it."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import torch

from axiscap.axes.dose_response import dose_slope, paired_effect
from axiscap.axes.stats import mcnemar_exact
from axiscap.steering import AssistantAxis, record_layer_outputs
from axiscap.steering.additive import steered

from .conftest import SHIPPED_AXIS, tiny_model


def _outputs(model, ids):
    with record_layer_outputs(model) as store:
        model(input_ids=ids)
    return {l: outs[0] for l, outs in store.items()}


@torch.inference_mode()
def test_steering_adds_the_shift_along_the_unit_axis_at_the_steered_layer_only():
    model = tiny_model("llama")
    axis = AssistantAxis(torch.randn(4, 32, generator=torch.Generator().manual_seed(1)) * 3, [1, 2], [0.0, 0.0], 2,
                         "tiny", 25.0, 1)
    ids = torch.tensor([[5, 17, 3, 40, 8]])
    plain = _outputs(model, ids)
    with steered(model, axis, {1: 2.5, 3: 0.0}):
        pushed = _outputs(model, ids)
    after = _outputs(model, ids)
    assert torch.equal(pushed[0], plain[0])  # before the steered layer: untouched
    torch.testing.assert_close(pushed[1] - plain[1], (2.5 * axis.unit(1)).expand_as(plain[1]), atol=1e-5, rtol=0)
    assert not torch.allclose(pushed[2], plain[2])  # later layers read the pushed stream
    assert all(torch.equal(after[l], plain[l]) for l in plain)  # the hooks went with the block
    assert all(not layer._forward_hooks for layer in model.model.layers)  # a zero shift added none either


def test_paired_effect_counts_changes_prompt_by_prompt_and_resamples_roles():
    roles = ["a", "a", "b", "b", "c", "c"]
    base = [{"in_character": x} for x in (True, True, False, True, True, False)]
    other = [{"in_character": x, "lift_sd": d} for x, d in
             ((False, 1.0), (True, 0.5), (True, 0.0), (False, 2.0), (False, 1.5), (False, -1.0))]
    effect = paired_effect(roles, base, other)
    # lost: prompts 0, 3, 4; gained: prompt 2
    assert (effect["lost"], effect["gained"]) == (3, 1)
    assert effect["mcnemar_p"] == round(mcnemar_exact(3, 1), 4) == 0.625
    assert effect["share_change"] == round((2 - 4) / 6, 4)
    assert effect["lift_sd"] == round(statistics.fmean([1.0, 0.5, 0.0, 2.0, 1.5, -1.0]), 4)
    lo, hi = effect["lift_sd_ci"]
    # Whole roles resampled: the interval lies within the role means' range.
    role_means = [0.75, 1.0, 0.25]
    assert min(role_means) <= lo <= effect["lift_sd"] <= hi <= max(role_means)


def test_dose_slope_is_the_least_squares_slope_of_the_verdicts_on_alpha():
    alphas = [-2.0, -1.0, 0.0, 1.0, 2.0] * 2
    verdicts = [True, True, True, False, False, True, False, True, False, False]
    roles = ["a"] * 5 + ["b"] * 5
    slope = dose_slope(roles, alphas, verdicts)
    assert slope["slope"] == round(statistics.linear_regression(alphas, [float(v) for v in verdicts]).slope, 4) == -0.25  # sum(x y) / sum(x x) = -5 / 20
    assert slope["n"] == 10 and slope["slope_ci"][0] <= -0.25 <= slope["slope_ci"][1]


def test_quick_dose_response_on_the_shipped_axis(smollm2, tmp_path):  # smollm2: model cached first
    out = tmp_path / "dose.json"
    run = subprocess.run([sys.executable, "-m", "axiscap.cli", "axes", "dose-response", "--device", "cpu", "--quick",
                          "--axis", str(SHIPPED_AXIS), "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["axis"] == "axes/smollm2-135m-instruct.safetensors"
    assert (report["band"], report["read_layer"]) == ([22, 23, 24, 25], 21)
    conditions = report["conditions"]
    assert list(conditions) == ["uncapped", "capped", "steered -2 sd", "steered -1 sd", "steered -0.5 sd",
                                "steered +0.5 sd", "steered +1 sd", "steered +2 sd"]
    assert all(c["n"] == 2 for c in conditions.values()) and len(report["answers"]) == 2
    assert conditions["uncapped"]["same_answer"] == 2 and "lift_sd" not in conditions["uncapped"]
    # Pushed two standard deviations toward the Assistant, the answers read higher on the axis at a
    # layer the push never touched than those pushed two away: what was said changed.
    assert conditions["steered +2 sd"]["lift_sd"] > 0 > conditions["steered -2 sd"]["lift_sd"]
    assert all(float(s) > 0 for s in report["sd"].values()) and sorted(report["sd"]) == ["21", "22", "23", "24", "25"]
    assert "2 answers of 2 check roles on 2 questions, read back at layer 21 (before the band 22-25)" in run.stdout
    assert "in-character share per sd toward the Assistant" in run.stdout
