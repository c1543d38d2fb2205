"""`axiscap axes calibrate`: the sweep's measures, the choice under a budget, stages and resuming."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from axiscap.axes.calibrate import CalibrateConfig, Point, choose, pareto_front, sweep_points, teacher_forced
from axiscap.axes.gate_calibration import calibrate_detector, lowest_ewma
from axiscap.axes.stats import mean_ci, wilson
from axiscap.steering import AxisHooks, load_axis, record_layer_outputs

from .conftest import REPO, chat_ids

SHIPPED = REPO / "axes" / "smollm2-135m-instruct.safetensors"


def calibrate(axis, out, *flags):
    return subprocess.run([sys.executable, "-m", "axiscap.cli", "axes", "calibrate", "--quick", "--device", "cpu",
                           "--axis", str(axis), "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=600)


def point(key, identical, lift):
    return {"point": key, "identical": identical, "role_lift": lift}


def test_choice_is_the_largest_lift_inside_the_budget():
    points = [point("a", 0.95, 5.0), point("b", 0.91, 12.0), point("c", 0.80, 30.0), point("d", 0.99, 1.0)]
    assert choose(points, 0.9) == (points[1], True)
    assert choose(points, 0.96) == (points[3], True)
    assert choose(points, 0.75) == (points[2], True)
    # Nothing inside: the least costly point, flagged.
    assert choose(points[:3], 0.999) == (points[0], False)
    assert {p["point"] for p in pareto_front(points)} == {"b", "c", "d", "a"}
    assert {p["point"] for p in pareto_front([*points, point("e", 0.90, 11.0)])} == {"a", "b", "c", "d"}


def test_confidence_intervals():
    lo, hi = wilson(7, 10)
    assert lo == pytest.approx(0.3968, abs=1e-3) and hi == pytest.approx(0.8922, abs=1e-3)
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and hi - mean == pytest.approx(1.96 / 3 ** 0.5) and mean - lo == pytest.approx(hi - mean)


def test_swept_bands_end_at_or_before_the_monitor_layer(tmp_path):
    cfg = CalibrateConfig("m", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    points = sweep_points(cfg, n_layers=30, monitor_layer=26)
    assert points and all(p.start + p.width - 1 <= 26 for p in points)
    assert {p.start for p in points} == set(range(10, 26, 2)) and {p.percentile for p in points} == {1, 2, 3, 5, 10, 25}
    assert Point(21, 6, 25.0).band == [21, 22, 23, 24, 25, 26] and Point(21, 6, 25.0).key == "21:26@p25"
    with pytest.raises(ValueError, match="no band to sweep: starts \\[27\\]"):
        sweep_points(CalibrateConfig("m", cfg.axis_in, cfg.out, starts=(27,)), n_layers=30, monitor_layer=26)
    with pytest.raises(ValueError, match="--percentiles must lie in"):
        CalibrateConfig("m", cfg.axis_in, cfg.out, percentiles=(0.0, 5.0))


@torch.inference_mode()
def test_teacher_forcing_tells_which_greedy_answers_capping_changes(smollm2):
    """The sweep's capability measure stands in for generating each point: an answer is unchanged by
    capping exactly when capping changes no greedy choice along the uncapped answer."""
    model, tokenizer = smollm2.model, smollm2.tokenizer
    axis = load_axis(SHIPPED)
    questions = ["What is the capital of Japan?", "Write a haiku about rain.", "How do I sort a list in Python?",
                 "Tell me about yourself.", "Give me three tips for sleeping better.", "What is 17 times 3?"]
    hooks = AxisHooks(model, axis)
    rows, changed = [], []
    try:
        for q in questions:
            ids = chat_ids(tokenizer, q)
            runs = []
            for capping in (False, True):
                hooks.set_cap_mask(torch.ones(1, 1, dtype=torch.bool) if capping else None)
                out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
                runs.append([t for t in out if t != tokenizer.eos_token_id])
            rows.append({"prompt_ids": ids, "answer_ids": runs[0], "ended": len(runs[0]) < 12})
            changed.append(runs[0] != runs[1])
    finally:
        hooks.remove()
    uncapped = teacher_forced(model, rows, axis, capping=False, batch_size=4)
    capped = teacher_forced(model, rows, axis, capping=True, batch_size=4)
    assert [c != u for c, u in zip(capped["choices"], uncapped["choices"])] == changed
    assert any(changed) and not all(changed), "the check needs both kinds of answer"
    # Uncapped teacher forcing chooses the answer that was generated (and its end).
    for row, choices in zip(rows, uncapped["choices"]):
        assert choices[:len(row["answer_ids"])] == row["answer_ids"]
    # Capping lifts the monitor projection of these answers, and never lowers it.
    assert all(c >= u - 1e-3 for c, u in zip(capped["monitor"], uncapped["monitor"]))


def paper_files(folder):
    """The shipped axis's direction with the build's own band and tau (its report.md), in the paper's
    published layout (role-ward vectors, caps as ceilings)."""
    shipped = load_axis(SHIPPED)
    built_tau = {21: 13.80, 22: 16.35, 23: 26.68, 24: 47.89, 25: 53.35, 26: 44.97}
    vectors = {f"layer_{l}/contrast": {"vector": -shipped.axis[l] * 2, "layer": l} for l in built_tau}
    caps = [{"vector": f"layer_{l}/contrast", "cap": -tau} for l, tau in built_tau.items()]
    torch.save(shipped.axis, folder / "assistant_axis.pt")
    torch.save({"vectors": vectors, "experiments": [{"id": "layers_21:27-p0.25", "interventions": caps}]},
               folder / "capping_config.pt")


def test_quick_calibration_of_an_imported_paper_axis_respects_the_budget_and_resumes(smollm2, tmp_path):
    paper_files(tmp_path)
    axis = tmp_path / "axis.safetensors"
    imported = subprocess.run([sys.executable, "-m", "axiscap.cli", "axes", "import-paper", "--axis-pt",
                               str(tmp_path / "assistant_axis.pt"), "--config", str(tmp_path / "capping_config.pt"),
                               "--experiment", "0", "--model", "smollm2-135m-instruct", "--out", str(axis)],
                              capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr
    original = load_axis(axis)
    assert original.cap_layers == list(range(21, 27)) and original.monitor_layer == 24  # the band's middle

    first = calibrate(axis, axis, "--capability-budget", "0.5")  # the input file itself is replaced
    assert first.returncode == 0, first.stderr[-3000:]
    for stage in ("input", "answers", "projections", "verify", "report"):
        assert f"stage {stage}\n" in first.stderr
    assert "stage sweep: 0 of 2 points measured before" in first.stderr and "stage choose: 22:23@p" in first.stderr
    work, report = tmp_path / "axis.calibrate", tmp_path / "axis.calibration"
    assert {p.name for p in report.iterdir()} == {"calibration.md", "pareto.png", "sweep.jsonl", "front.jsonl",
                                                  "verify.json"}
    points = [json.loads(line) for line in (work / "sweep.jsonl").read_text().splitlines()]
    assert [p["point"] for p in points] == ["22:23@p5", "22:23@p25"]  # --quick: one band ending before layer 24
    chosen = load_axis(axis, n_layers=30, hidden_size=576)
    picked = next(p for p in points if p["point"] == chosen.calibration["point"])
    assert picked["identical"] >= 0.5
    assert picked["role_lift"] == max(p["role_lift"] for p in points if p["identical"] >= 0.5)
    assert chosen.cap_layers == [22, 23] and chosen.cap_thresholds == pytest.approx(picked["tau"])
    assert chosen.percentile == picked["percentile"]
    torch.testing.assert_close(chosen.axis, original.axis)  # the direction is kept
    assert chosen.monitor_layer == 23  # the server reads tau at the monitor layer: it moves into the band
    train_tokens = load_file(str(tmp_path / "axis.calibrate" / "projections.safetensors"))["train"]
    assert chosen.gated_cap_thresholds == pytest.approx(
        [max(t, torch.quantile(train_tokens[l], 0.25).item()) for l, t in zip((22, 23), chosen.cap_thresholds)])
    assert points[0]["tau"][0] < points[1]["tau"][0]  # tau at a layer rises with the percentile
    # The gated policy's threshold: the 5th percentile of the train answers' own means at the monitor layer.
    train = [r for r in map(json.loads, (work / "answers.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    per_token = load_file(str(work / "projections.safetensors"))["train"][23].tolist()
    means, at = [], 0
    for r in train:
        n = max(len(r["answer_ids"]), 1)
        means.append(sum(per_token[at:at + n]) / n)
        at += n
    assert at == len(per_token) and len(means) > 1
    assert chosen.gate_threshold == pytest.approx(float(np.percentile(means, 5)), abs=1e-4)
    verify = json.loads((report / "verify.json").read_text())
    assert verify["input"]["band"] == "21:26" and verify["chosen"]["band"] == "22:23"
    assert verify["n_validation"] == 4 and verify["n_roles"] == 3
    text = (report / "calibration.md").read_text()
    assert "**Chosen**: " + picked["point"] in text and "| 22–23 | 25 |" in text

    # The Pareto front generated for real, after the uncapped baseline: the answers stage's own role
    # answers, so it counts as many in character as verify's uncapped run of the same answers.
    front = [json.loads(line) for line in (work / "front.jsonl").read_text().splitlines()]
    assert (report / "front.jsonl").read_text() == (work / "front.jsonl").read_text()
    assert front[0]["point"] == "uncapped" and front[0]["in_character"] == verify["uncapped"]["in_character"]
    assert sorted(p["point"] for p in front[1:]) == sorted(p["point"] for p in pareto_front(points))
    assert all(p["n_roles"] == 3 and 0 <= p["in_character"] <= 3 for p in front)
    assert f"| uncapped | – | – | – | {front[0]['in_character']} of 3 | – |" in text
    # The low tail: each role answer's 10th percentile of its tokens' monitor projections (here 24,
    # uncapped), recomputed from the layer's own output, one answer at a time.
    roles = [r for r in map(json.loads, (work / "answers.jsonl").read_text().splitlines()) if r["kind"] == "role"]
    lows = []
    for r in roles:
        with torch.no_grad(), record_layer_outputs(smollm2.model, [24]) as seen:
            smollm2.model(input_ids=torch.tensor([r["prompt_ids"] + r["answer_ids"]]))
        tokens = seen[24][0][0, len(r["prompt_ids"]):].float() @ original.unit(24)
        lows.append(float(np.percentile(tokens.numpy(), 10)))
    # Batched with left padding there, one at a time here: other kernel shapes, so a tolerance.
    assert front[0]["low"][0] == pytest.approx(float(np.mean(lows)), rel=1e-3, abs=1e-2)

    # Interrupted in the sweep after one point: the rerun measures only the other; a new budget, a new choice.
    (work / "sweep.jsonl").write_text((work / "sweep.jsonl").read_text().splitlines()[0] + "\n")
    again = calibrate(axis, axis, "--capability-budget", "1.0", "--no-role-scoring")
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("input", "answers", "projections"):
        assert f"stage {stage}: " in again.stderr
    assert "stage sweep: 1 of 2 points measured before" in again.stderr
    assert f"stage front: {len(front)} of {len(front)} points measured before" in again.stderr
    assert [json.loads(line)["point"] for line in (work / "sweep.jsonl").read_text().splitlines()] == \
        ["22:23@p5", "22:23@p25"]
    assert "stage verify\n" in again.stderr and "stage report\n" in again.stderr
    assert load_axis(axis).calibration["budget"] == 1.0
    # Nothing new: every stage is skipped.
    third = calibrate(axis, axis, "--capability-budget", "1.0")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "all 2 points measured before, skipped" in third.stderr and "as before, skipped" in third.stderr
    assert "stage verify: " in third.stderr and "stage report: " in third.stderr
    # Started from the kept input, not from the file the first run replaced.
    assert json.loads((report / "verify.json").read_text())["input"]["band"] == "21:26"
    # A report whose figures are not the measured ones (a grid widened, the same choice) is written again.
    (report / "front.jsonl").write_text("")
    fourth = calibrate(axis, axis, "--capability-budget", "1.0")
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    assert "stage verify: " in fourth.stderr and "stage report\n" in fourth.stderr
    assert (report / "front.jsonl").read_text() == (work / "front.jsonl").read_text()

    # The paper's tau beside today's: the same grid on both populations; only the new points run.
    fifth = calibrate(axis, axis, "--capability-budget", "1.0", "--tau-populations", "ordinary", "paper",
                      "--no-role-scoring")
    assert fifth.returncode == 0, fifth.stderr[-3000:]
    assert "stage role projections\n" in fifth.stderr and "stage sweep: 2 of 4 points measured before" in fifth.stderr
    swept = {p["point"]: p for p in map(json.loads, (work / "sweep.jsonl").read_text().splitlines())}
    assert sorted(swept) == ["22:23@p25", "22:23@p25/paper", "22:23@p5", "22:23@p5/paper"]
    role_tokens = load_file(str(work / "role_projections.safetensors"))["role"]
    assert role_tokens.shape == (30, sum(max(len(r["answer_ids"]), 1) for r in roles))
    mixed = torch.cat([load_file(str(work / "projections.safetensors"))["train"], role_tokens], dim=1)
    for q in (5, 25):
        paper = swept[f"22:23@p{q}/paper"]
        assert paper["population"] == "paper" and swept[f"22:23@p{q}"].get("population", "ordinary") == "ordinary"
        assert paper["tau"] == pytest.approx([torch.quantile(mixed[l], q / 100).item() for l in (22, 23)])
    assert "| 22–23 | 25 (paper) |" in (report / "calibration.md").read_text()


def test_a_population_tau_cannot_come_from_is_refused(tmp_path):
    run = calibrate(SHIPPED, tmp_path / "x.safetensors", "--tau-populations", "roles")
    assert run.returncode == 2 and "--tau-populations takes ordinary and/or paper, not ['roles']" in run.stderr


def test_a_budget_outside_zero_to_one_is_refused(tmp_path):
    run = calibrate(SHIPPED, tmp_path / "x.safetensors", "--capability-budget", "90")
    assert run.returncode == 2 and "--capability-budget is a share between 0 and 1, not 90" in run.stderr


def test_the_shipped_axis_against_its_recalibration():
    """The shipped axis (22:25@p5, chosen on the 41 roles of the earlier persona data) and the committed
    recalibration on today's 82 roles: the shipped point is measured there with the very tau it ships,
    inside the budget; the recalibration's choice ties it (the same identical share, a lift inside its
    interval), and generating for real it keeps the same validation answers and role answers in
    character as the shipped one, which is why the shipped one (monitor layer 25) was kept."""
    axis = load_axis(SHIPPED)
    record = axis.calibration
    folder = REPO / "axes" / "smollm2-135m-instruct.calibration"
    points = [json.loads(line) for line in (folder / "sweep.jsonl").read_text().splitlines()]
    assert len(points) == 156
    shipped = next(p for p in points if p["point"] == record["point"])
    assert record["inside_budget"] and shipped["identical"] >= record["budget"] == 0.85
    assert axis.cap_layers == Point(shipped["start"], shipped["width"], shipped["percentile"]).band
    assert axis.cap_thresholds == pytest.approx(shipped["tau"]) and axis.monitor_layer == axis.cap_layers[-1]
    chosen, inside = choose(points, record["budget"])
    assert inside and chosen["identical"] == shipped["identical"]
    assert chosen["role_lift_ci"][0] <= shipped["role_lift"] <= chosen["role_lift"]
    assert f"**Chosen**: {chosen['point']} for a capability budget of 0.85" in (folder / "calibration.md").read_text()
    verify = json.loads((folder / "verify.json").read_text())
    assert verify["input"]["band"] == "22:25" and verify["input"]["identical"] == verify["chosen"]["identical"] >= 0.85
    assert abs(verify["input"]["in_character"] - verify["chosen"]["in_character"]) <= 2
    # The front generating for real: no point inside the budget takes role answers out of character
    # (the 30% fewer than uncapped); only bands that change about half the answers or more do.
    front = [json.loads(line) for line in (folder / "front.jsonl").read_text().splitlines()]
    assert front[0]["point"] == "uncapped" and front[0]["in_character"] == verify["uncapped"]["in_character"]
    assert {p["point"] for p in front[1:]} == {p["point"] for p in pareto_front(points)}
    assert all(p["n_roles"] == verify["n_roles"] == 82 for p in front)
    identical = {p["point"]: p["identical"] for p in points}
    cut = [p for p in front[1:] if p["in_character"] <= 0.7 * front[0]["in_character"]]
    assert cut and max(identical[p["point"]] for p in cut) < 0.55
    assert all(p["in_character"] > 0.9 * front[0]["in_character"] for p in front[1:] if identical[p["point"]] >= 0.85)
    # ... while capping lifts their low tail (the drift floor) at every point of the front.
    assert all(p["low"][0] > front[0]["low"][0] for p in front[1:])


def test_gate_only_adds_the_gate_threshold_and_keeps_band_and_tau(smollm2, smollm2_axis, tmp_path):
    from axiscap.axes.calibration_data import calibration_prompts
    from axiscap.steering import record_layer_outputs
    from axiscap.steering.gate import gate_threshold

    out = tmp_path / "gated.safetensors"
    run = calibrate(SHIPPED, out, "--gate-only")
    assert run.returncode == 0, run.stderr[-3000:]
    axis = load_axis(out, n_layers=30, hidden_size=576)
    assert axis.cap_layers == smollm2_axis.cap_layers and axis.cap_thresholds == smollm2_axis.cap_thresholds
    torch.testing.assert_close(axis.axis, smollm2_axis.axis)
    assert axis.gate_calibration["n_answers"] == 4  # --quick: four train prompts

    # Directly: each train prompt's greedy answer (8 tokens, --quick) through model.generate, the mean
    # projection of its own tokens at the monitor layer (as a prompt message's figures are taken, which
    # is what the gate compares), and the 5th percentile of those means. The token detector is fitted on
    # the same answers read as the server reads them (each token's projection at the position that
    # produced it): its threshold is their lowest EWMA's 5th percentile.
    layer, means, lows = axis.monitor_layer, [], []
    band = {l: [] for l in axis.cap_layers}  # the answers' token projections at each capped layer
    detector = axis.gate_detector
    assert detector["train"]["n"] == 4 and detector["validation"]["n"] == 4 and detector["role"]["n"] == 3
    for prompt in calibration_prompts("train")[:4]:
        ids = smollm2.tokenizer.apply_chat_template(list(prompt.messages), add_generation_prompt=True,
                                                    return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            full = smollm2.model.generate(ids, max_new_tokens=8, do_sample=False)
            with record_layer_outputs(smollm2.model, [layer, *band]) as seen:
                smollm2.model(input_ids=full)
        for l, tokens in band.items():
            tokens += (seen[l][0][0, ids.shape[1]:].float() @ axis.unit(l)).tolist()
        projections = seen[layer][0][0].float() @ axis.unit(layer)
        means.append(projections[ids.shape[1]:].mean().item())
        served = projections[ids.shape[1] - 1:full.shape[1] - 1].tolist()
        lows.append(lowest_ewma(served, detector["ewma_lambda"], detector["warmup"]))
    assert gate_threshold(axis) == pytest.approx(float(np.percentile(means, 5)), rel=1e-3, abs=1e-3)
    # 5% of 4 answers is none: the threshold is the lowest answer's own statistic, which does not trip.
    assert detector["threshold"] == pytest.approx(sorted(lows)[0], rel=1e-3, abs=1e-3)
    assert detector["train"]["tripped"] == 0
    # The gated cap: per capped layer the 25th percentile of those tokens, or the always-on tau if higher.
    want = [max(tau, float(np.percentile(band[l], 25))) for l, tau in zip(axis.cap_layers, axis.cap_thresholds)]
    assert axis.gated_cap_thresholds == pytest.approx(want, rel=1e-3, abs=1e-2)
    assert all(g >= t for g, t in zip(axis.gated_cap_thresholds, axis.cap_thresholds))


def test_the_detector_is_calibrated_on_train_and_chosen_on_validation_against_roles():
    generator = torch.Generator().manual_seed(1)

    def answers(n, level, dip):  # ordinary answers wander around level; drifting ones sink by dip halfway
        return [(torch.randn(40, generator=generator) * 4 + level - dip * (torch.arange(40) >= 20)).tolist()
                for _ in range(n)]

    train, validation, role = answers(200, 20.0, 0.0), answers(100, 20.0, 0.0), answers(100, 20.0, 12.0)
    detector, record = calibrate_detector(train, validation, role, max_tokens=40)
    lows = sorted(lowest_ewma(t, detector.ewma_lambda, detector.warmup) for t in train)
    assert detector.threshold == lows[10]  # 5% of 200: the 10 below it trip
    assert record["train"]["tripped"] == sum(v < detector.threshold for v in lows) == 10
    # A sustained dip is what an EWMA sees and a single token does not: the chosen one averages.
    assert detector.ewma_lambda < 1.0 and record["auc"] > 0.95
    assert record["role"]["tripped"] > 0.8 * len(role) and record["validation"]["tripped"] <= 0.1 * len(validation)
    for t in validation + role:  # the recorded rates are the detector's own trips
        trips = detector.first_trip(t) is not None
        assert trips == (lowest_ewma(t, detector.ewma_lambda, detector.warmup) < detector.threshold)
