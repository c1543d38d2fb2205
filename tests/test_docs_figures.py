"""The figures the docs state are the committed result files' figures (docs/figures.py, ``make report``)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("docs_figures", ROOT / "docs" / "figures.py")
figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figures)

# What a measured figure looks like in prose: a share, "k of n", an interval, a signed lift, a ratio or
# an AUC-like decimal, a speed.
MEASURED = re.compile(r"\d+(?:\.\d+)?%|\b\d+ of \d+\b|\[[−+-]?\d+(?:\.\d+)?, [−+-]?\d+(?:\.\d+)?\]"
                      r"|(?<![\w.])[+−]\d+\.\d+|\b0\.\d{2,}\b|\d+(?:\.\d+)? ?(?:tok/s|ms\b)|\d(?:\.\d+)?×")
# Settings and definitions, not measurements: interval levels, the detector's false-trip target, the
# budget the shipped axis was calibrated with, versions, vLLM's logprob floor.
NOT_MEASURED = {"95%", "5%", "0.85", "0.32", "−9999.0"}


def test_every_block_is_what_its_files_say():
    stale = figures.stale()
    assert not stale, "run `make report`:\n" + "".join(stale.values())


def test_blocks_and_renderers_match_one_to_one():
    used = [m["name"] for page in figures.PAGES for m in figures.BLOCK.finditer((ROOT / page).read_text())]
    assert sorted(set(used)) == sorted(figures.BLOCKS), "a block without a renderer, or a renderer no page uses"
    with pytest.raises(KeyError, match="no figures block named 'nope'"):
        figures.render("<!-- figures: nope -->\n<!-- /figures -->")


def test_prose_outside_the_blocks_states_no_measured_figure():
    found = []
    for page in figures.PAGES:
        prose = figures.BLOCK.sub("", (ROOT / page).read_text())
        found += [f"{page}: {m.group()!r} in {line.strip()[:100]!r}" for line in prose.splitlines()
                  for m in MEASURED.finditer(line) if m.group() not in NOT_MEASURED]
    assert not found, "a figure typed by hand (render it from its file in docs/figures.py):\n" + "\n".join(found)


def test_a_changed_result_file_makes_its_block_stale(tmp_path, monkeypatch):
    verify = json.loads((figures.CALIBRATION / "verify.json").read_text())
    verify["uncapped"]["in_character"] += 1
    (tmp_path / "verify.json").write_text(json.dumps(verify))
    for name in ("sweep.jsonl", "front.jsonl"):
        (tmp_path / name).write_text((figures.CALIBRATION / name).read_text())
    monkeypatch.setattr(figures, "CALIBRATION", tmp_path)
    stale = figures.stale()
    assert list(stale) == ["docs/axes.md"]
    assert f"+| uncapped | – | – | {verify['uncapped']['in_character']} of {verify['n_roles']} |" in stale["docs/axes.md"]


def test_committed_reports_carry_no_machine_paths():
    pattern = re.compile(r"/(?:tmp|home|root|work|Users)/|[A-Z]:\\\\")
    reports = [p for p in (ROOT / "axes").rglob("*.json*") if ".report" in str(p) or ".calibration" in str(p)]
    reports += list((ROOT / "evals" / "reports").rglob("*.json"))
    assert reports
    assert [str(p) for p in reports if pattern.search(p.read_text())] == []
