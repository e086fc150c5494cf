"""`cimlic demo --quick` end to end through main(argv): Digits world, tiny CLIP pre-training, every method, report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cimlic.apps.cli import main
from cimlic.apps.demo import format_seed_table, seed_statistics
from cimlic.digits.settings import METHODS
from runs import chance_map


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--out", str(out), "--clip-dir", str(tmp_path / "clip")]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == set(METHODS)
    results = summary["results"]
    chance = chance_map(out / "data" / "test.txt", out / "data" / "classes.txt")  # about 15
    assert results["zeroshot"]["map"] > chance - 3  # the quick CLIP is barely pre-trained: zero-shot near chance
    for name, result in results.items():  # every method learns something from its two epochs
        assert name == "zeroshot" or result["map"] > results["zeroshot"]["map"] + 1.0, (name, result["map"])
        assert (out / name / "eval.json").is_file()
    html = (out / "report.html").read_text()
    assert "results-table" in html and "<svg" in html
    printed = capsys.readouterr().out
    assert all(name in printed for name in METHODS)
    first = summary["seconds"]
    assert main(argv) == 0  # world, CLIP and finished runs are reused
    again = json.loads((out / "summary.json").read_text())
    assert again["results"] == summary["results"] and again["seconds"] < first


def test_seed_statistics_by_hand():
    """Mean, sample std (n−1) and the paired gain over zero-shot, from three made-up seeds."""
    per_seed = [
        {"zeroshot": {"map": 60.0, "head": 70.0, "medium": 60.0, "tail": 50.0},
         "coop": {"map": 63.0, "head": 75.0, "medium": 61.0, "tail": 52.0}},
        {"zeroshot": {"map": 62.0, "head": 72.0, "medium": 62.0, "tail": 52.0},
         "coop": {"map": 64.0, "head": 74.0, "medium": 63.0, "tail": 55.0}},
        {"zeroshot": {"map": 64.0, "head": 74.0, "medium": 64.0, "tail": 54.0},
         "coop": {"map": 68.0, "head": 79.0, "medium": 65.0, "tail": 57.0}},
    ]  # fmt: skip
    stats = seed_statistics(per_seed)
    assert stats["zeroshot"]["map"] == pytest.approx([62.0, 2.0])  # std of 60, 62, 64 with n−1 = 2
    assert stats["coop"]["map"] == pytest.approx([65.0, math.sqrt(7.0)])  # deviations -2, -1, 3: 14 / 2
    assert stats["coop"]["gain_map"] == pytest.approx([3.0, 1.0])  # gains 3, 2, 4
    assert stats["zeroshot"]["gain_tail"] == pytest.approx([0.0, 0.0])
    table = format_seed_table(stats, 3)
    assert (
        "| coop | 65.00 ± 2.65 |" in table and "+3.00 / +4.00 / +1.00 / +2.67" in table
    )  # head gains 5, 2, 5; tail 2, 3, 3


@pytest.mark.slow
def test_demo_full_ordering(tmp_path):
    """`make demo` at seed 0: zero-shot far above chance, HP-DVAL above zero-shot, every method above chance.

    The full pre-training (about 2.5 minutes on 2 cores) is reused from checkpoints/digits when it is there.
    """
    clip_dir = Path(__file__).resolve().parents[1] / "checkpoints" / "digits"
    assert main(["demo", "--out", str(tmp_path / "demo"), "--clip-dir", str(clip_dir)]) == 0
    results = json.loads((tmp_path / "demo" / "summary.json").read_text())["results"]
    chance = chance_map(tmp_path / "demo" / "data" / "test.txt", tmp_path / "demo" / "data" / "classes.txt")
    assert results["zeroshot"]["map"] > chance + 30, (results["zeroshot"]["map"], chance)
    assert results["hpdval"]["map"] > results["zeroshot"]["map"] + 2
    assert all(r["map"] > chance + 25 for r in results.values()), results
