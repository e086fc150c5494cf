"""`cimlic demo --quick` end to end through main(argv): Digits world, tiny CLIP pre-training, every method, report."""

from __future__ import annotations

import json

from cimlic.cli import main
from cimlic.demo import METHODS


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--out", str(out), "--clip-dir", str(tmp_path / "clip")]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == set(METHODS)
    for name, result in summary["results"].items():
        assert 0 < result["map"] < 100, name
        assert (out / name / "eval.json").is_file()
    html = (out / "report.html").read_text()
    assert "results-table" in html and "<svg" in html
    printed = capsys.readouterr().out
    assert all(name in printed for name in METHODS)
    first = summary["seconds"]
    assert main(argv) == 0  # world, CLIP and finished runs are reused
    again = json.loads((out / "summary.json").read_text())
    assert again["results"] == summary["results"] and again["seconds"] < first
