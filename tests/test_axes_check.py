"""`axiscap axes check`: axis files checked on the same held-out answers, bad files refused first."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from axiscap.axes.check import bag_of_words_scores
from axiscap.axes.stats import auc_ci, roc_auc

from .conftest import SHIPPED_AXIS


def check(*flags):
    return subprocess.run([sys.executable, "-m", "axiscap.cli", "axes", "check", "--device", "cpu", *flags],
                          capture_output=True, text=True, timeout=600)


def test_quick_check_measures_every_axis_on_the_same_answers(smollm2, tmp_path):  # smollm2: model cached first
    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(SHIPPED_AXIS, copy)
    out = tmp_path / "check.json"
    run = check("--quick", "--axis", str(SHIPPED_AXIS), str(copy), "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    figures = report["axes"]
    # Named as the working directory sees them (the repository here), or by file name: no machine paths.
    assert sorted(figures) == ["axes/smollm2-135m-instruct.safetensors", "copy.safetensors"]
    shipped, copied = figures["axes/smollm2-135m-instruct.safetensors"], figures["copy.safetensors"]
    # --quick: the 5 default conditions and one check role, on one check question
    counts = (shipped["n_default"], shipped["n_roles"], shipped["n_questions"], shipped["all_roleplay"]["n"])
    assert counts == (5, 1, 1, 1)
    assert shipped == copied  # the same answers, the same axis: the same figures
    assert shipped["all_roleplay"]["auc"] in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # a share of 5 default answers
    assert shipped["fully_in_role"]["n"] <= 1
    # The one role answer falls in one score's row, with the AUC of all role answers.
    scored = [figure for figure in shipped["by_score"].values() if figure["n"]]
    assert sorted(shipped["by_score"]) == ["0", "1", "2", "3"] and len(scored) == 1
    assert scored[0]["auc"] == shipped["all_roleplay"]["auc"]
    assert shipped["by_score"]["3"]["n"] == shipped["fully_in_role"]["n"]
    assert f"{SHIPPED_AXIS} (monitor layer 25): 5 default answers vs 1 role answers" in run.stdout
    # Every answer's values are kept; the same axis twice differs by nothing; too few roles for a
    # cross-validated bag of words.
    assert len(report["answers"]) == 6 and report["baselines"]["bag_of_words"] is None
    assert {a["axes/smollm2-135m-instruct.safetensors: projection"] for a in report["answers"]} == \
        {a["copy.safetensors: projection"] for a in report["answers"]}
    paired = report["paired"]["axes/smollm2-135m-instruct.safetensors minus copy.safetensors"]
    assert paired["difference"] == 0.0 and paired["cluster_ci"] in (None, [0.0, 0.0])


def test_a_bad_axis_file_is_refused_before_the_model_loads(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    run = check("--axis", str(SHIPPED_AXIS), str(bad))
    assert run.returncode == 2 and str(bad) in run.stderr and "not a readable safetensors file" in run.stderr
    assert "loaded smollm2" not in run.stderr


def test_auc_interval():
    lo, hi = auc_ci(0.9, 50, 240)
    assert 0.83 < lo < 0.85 and 0.95 < hi < 0.97  # Hanley-McNeil: SE 0.030 here
    assert auc_ci(0.5, 1, 1) == (0.0, 1.0)
    assert auc_ci(0.7, 0, 10) == (0.0, 1.0)


def test_a_report_names_an_axis_file_without_a_machine_path(tmp_path, monkeypatch):
    from axiscap.cli import _report_key

    monkeypatch.chdir(tmp_path)
    (tmp_path / "axes").mkdir()
    assert _report_key(tmp_path / "axes" / "m.safetensors") == "axes/m.safetensors"
    assert _report_key(Path("axes/m.safetensors")) == "axes/m.safetensors"
    assert _report_key(Path("/elsewhere/build/m.safetensors")) == "m.safetensors"


def test_the_bag_of_words_baseline_scores_each_role_with_a_model_that_never_saw_it():
    default = [f"I am happy to help you with question {i}. Here is a clear answer." for i in range(10)]
    roles = {name: [f"{word} {word}! The {word} speaks of ancient fire and shadow, question {i}." for i in range(4)]
             for name, word in (("dragon", "roar"), ("ghost", "boo"), ("witch", "hex"), ("pirate", "arr"),
                                ("demon", "doom"))}
    texts = default + [t for answers in roles.values() for t in answers]
    is_default = [True] * len(default) + [False] * (len(texts) - len(default))
    groups = [f"default: {i % 5}" for i in range(len(default))] + [n for n, a in roles.items() for _ in a]
    scores = bag_of_words_scores(texts, is_default, groups)
    assert roc_auc(scores[:len(default)], scores[len(default):]) == 1.0  # the shared words tell them apart
    # Each role's own word (roar, boo, ...) is never seen in training: out of fold, it carries nothing.
    assert len(scores) == len(texts) and all(0 <= p <= 1 for p in scores)
    assert bag_of_words_scores(texts[:14], is_default[:14], groups[:14]) is None  # one role: too few folds
