"""`cimlic demo --quick` end to end through main(argv): generated images, LT split, training, evaluation."""

from __future__ import annotations

import json

import numpy as np

from cimlic.cli import main
from cimlic.data.labels import read_classes, read_label_list
from cimlic.demo import RUNS


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--seed", "1"]) == 0
    summary = json.loads((out / "eval.json").read_text())
    assert set(summary["results"]) == set(RUNS)
    for result in summary["results"].values():
        assert 0 < result["map"] < 100 and result["ap_variant"] == "sklearn"
        assert result["num_images"] == 300
    classes = read_classes(out / "data" / "classes.txt")
    train = read_label_list(out / "data" / "train.txt", classes)
    counts = np.sort(train.class_counts())[::-1]
    assert counts[0] >= 10 * counts[-1]  # the builder made the training split long-tailed
    assert (out / "data" / "images" / f"{train.ids[0]}.png").is_file()
    assert "db_focal+class_aware" in capsys.readouterr().out
