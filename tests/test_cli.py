"""The command line through ``main(argv)``: split, evaluate, and one-line errors on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cimlic.apps.cli import main
from cimlic.data.labels import read_classes, read_id_list, read_label_list


@pytest.fixture(scope="module")
def voc(shared_data):
    return shared_data / "voc_lt"


def test_split_longtail_reproduces_published_voc_lt(voc, tmp_path, capsys):
    out = tmp_path / "train.txt"
    argv = ["split", "longtail", "--labels", str(voc / "voc2012_trainval_pool.txt"), "--classes",
            str(voc / "classes.txt"), "--n-max", "800", "--seed", "0", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert read_id_list(out) == read_id_list(voc / "official_train_ids.txt")
    printed = capsys.readouterr().out
    assert "1142 images" in printed and "max 775 min 4" in printed and "head/medium/tail 6/6/8" in printed
    classes = read_classes(voc / "classes.txt")
    np.testing.assert_array_equal(
        read_label_list(out, classes).targets, read_label_list(voc / "train.txt", classes).targets
    )


def test_split_longtail_n_max_too_large(voc, tmp_path, capsys):
    argv = ["split", "longtail", "--labels", str(voc / "voc2012_trainval_pool.txt"), "--classes",
            str(voc / "classes.txt"), "--n-max", "5000", "--out", str(tmp_path / "t.txt")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "voc2012_trainval_pool.txt: class 'person' needs 5000 more images" in err and err.count("\n") == 1
    assert not (tmp_path / "t.txt").exists()
    assert main([*argv[:-4], "--n-max", "5000", "--clamp", "--out", str(tmp_path / "t.txt")]) == 0


def test_split_partial(voc, tmp_path):
    out = tmp_path / "p.txt"
    argv = ["split", "partial", "--labels", str(voc / "train.txt"), "--classes", str(voc / "classes.txt"),
            "--known", "0.3", "--seed", "0", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    classes = read_classes(voc / "classes.txt")
    full, part = read_label_list(voc / "train.txt", classes), read_label_list(out, classes)
    known = part.targets != -1
    assert abs(known.mean() - 0.3) < 0.02 and (part.targets[known] == full.targets[known]).all()
    again = tmp_path / "p2.txt"
    assert main([*argv[:-2], "--out", str(again)]) == 0
    assert again.read_text() == out.read_text()  # seeded


def test_split_fewshot(shared_data, tmp_path):
    root = shared_data / "voc_fewshot"
    train = tmp_path / "train.txt"  # the published train lists together form a base+novel training pool
    train.write_text((root / "train_base.txt").read_text() + (root / "train_novel.txt").read_text())
    out = tmp_path / "fs"
    argv = ["split", "fewshot", "--labels", str(train), "--classes", str(root / "classes.txt"), "--novel", "voc",
            "--shots", "1", "5", "--episodes", "3", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    classes = read_classes(root / "classes.txt")
    assert read_label_list(out / "train_base.txt", classes).ids == read_label_list(root / "train_base.txt", classes).ids
    assert (
        read_label_list(out / "train_novel.txt", classes).ids == read_label_list(root / "train_novel.txt", classes).ids
    )
    novel_idx = [classes.index(n) for n in ("cat", "dog", "pottedplant", "sheep", "sofa", "tvmonitor")]
    for k in (1, 5):
        for e in (1, 2, 3):
            ep = read_label_list(out / f"train_novel_{k}shot_{e}.txt", classes)
            assert ((ep.targets[:, novel_idx] == 1).sum(axis=0) == k).all()
    assert main([*argv[:6], "--novel", "cat,zebra", "--out", str(out)]) == 2


def test_evaluate_command(voc, tmp_path, capsys):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    classes = read_classes(voc / "classes.txt")
    test = read_label_list(voc / "test.txt", classes)
    rng = np.random.default_rng(0)
    scores = rng.normal(size=test.targets.shape) + 1.5 * test.targets  # informative logits
    np.save(tmp_path / "s.npy", scores)
    argv = ["evaluate", "--scores", str(tmp_path / "s.npy"), "--labels", str(voc / "test.txt"),
            "--train-labels", str(voc / "train.txt"), "--classes", str(voc / "classes.txt"),
            "--json", str(tmp_path / "r.json")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "head" in out and "tail" in out and "logits" in out
    result = json.loads((tmp_path / "r.json").read_text())
    expected = np.mean([sklearn_metrics.average_precision_score(test.targets[:, c], scores[:, c]) for c in range(20)])
    assert result["map"] == pytest.approx(100 * expected, abs=1e-9)
    assert result["ap_variant"] == "sklearn" and result["head"] is not None


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: np.save(p, np.zeros((10, 20))), "expected shape (4952, 20)"),
        (lambda p: np.save(p, np.full((4952, 20), np.nan)), "NaN or inf"),
        (lambda p: None, "score file not found"),
    ],
)
def test_evaluate_bad_scores(voc, tmp_path, capsys, make, message):
    path = tmp_path / "s.npy"
    make(path)
    argv = ["evaluate", "--scores", str(path), "--labels", str(voc / "test.txt"), "--classes", str(voc / "classes.txt")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err and err.count("\n") == 1


def test_evaluate_probs_out_of_range(voc, tmp_path, capsys):
    np.save(tmp_path / "s.npy", np.full((4952, 20), 3.0))
    argv = ["evaluate", "--scores", str(tmp_path / "s.npy"), "--labels", str(voc / "test.txt"), "--classes",
            str(voc / "classes.txt"), "--scores-kind", "probs"]  # fmt: skip
    assert main(argv) == 2
    assert "outside [0, 1]" in capsys.readouterr().err


def test_missing_files_are_one_line_errors(tmp_path, capsys):
    assert main(["split", "partial", "--labels", str(tmp_path / "x.txt"), "--classes", str(tmp_path / "c.txt"),
                 "--known", "0.5", "--out", str(tmp_path / "o.txt")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err == f"cimlic: error: {tmp_path / 'c.txt'}: class file not found\n"
