"""`axiscap axes check`: axis files checked on the same held-out answers, bad files refused first."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from axiscap.axes.stats import auc_ci

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
    figures = json.loads(out.read_text())["axes"]
    shipped, copied = figures[str(SHIPPED_AXIS)], figures[str(copy)]
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
