"""Metrics (METHODS §2) against sklearn, hand-computed examples and the shared VOC-LT / COCO-LT label lists."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch

from cimlic.data.labels import read_classes, read_label_list
from cimlic.metrics import (
    Evaluator,
    ScoreFileError,
    average_precision,
    evaluate,
    format_table,
    list_ap_variants,
    per_class_ap,
    read_scores,
    sigmoid,
    threshold_metrics,
)


def _labels(shared_data, name: str, split: str):
    classes = read_classes(shared_data / name / "classes.txt")
    return read_label_list(shared_data / name / f"{split}.txt", classes)


# ------------------------------------------------------------------------------------------- AP
def test_list_ap_variants_and_unknown_variant():
    assert list_ap_variants() == ["sklearn", "voc_all_point", "voc07_11pt"]
    with pytest.raises(ValueError, match="valid"):
        average_precision([0.1, 0.2], [1, 0], variant="nope")


@pytest.mark.parametrize(("name", "n_images", "n_classes"), [("voc_lt", 4952, 20), ("coco_lt", 5000, 80)])
@pytest.mark.parametrize("decimals", [None, 1], ids=["continuous", "tied"])
def test_sklearn_variant_equals_sklearn(shared_data, name, n_images, n_classes, decimals):
    skm = pytest.importorskip("sklearn.metrics")
    test = _labels(shared_data, name, "test")
    assert test.targets.shape == (n_images, n_classes)
    rng = np.random.default_rng(0)
    # scores loosely correlated with the labels, so APs span a useful range
    scores = (rng.random(test.targets.shape) + 0.5 * test.targets) / 1.5  # probabilities in [0, 1]
    if decimals is not None:
        scores = np.round(scores, decimals)  # many tied scores per class
        assert len(np.unique(scores[:, 0])) < 20
    ap = per_class_ap(scores, test.targets, "sklearn")
    ref = np.array([skm.average_precision_score(test.targets[:, c], scores[:, c]) for c in range(n_classes)])
    np.testing.assert_array_equal(ap, ref)  # same summation order: bit-identical
    res = evaluate(scores, test.targets, test.classnames, scores_are_logits=False)
    assert res["map"] == pytest.approx(100 * ref.mean(), rel=1e-12)
    assert res["num_images"] == n_images and res["no_positive_classes"] == []


@pytest.mark.parametrize("decimals", [None, 1], ids=["continuous", "tied"])
def test_sklearn_variant_equals_sklearn_synthetic(decimals):
    """The same parity on a synthetic imbalanced problem (always runs: no shared label lists needed)."""
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(1)
    rates = np.array([0.5, 0.2, 0.05, 0.01, 0.003])  # head to tail, the last class with a single positive
    targets = (rng.random((1000, rates.size)) < rates).astype(np.int8)
    targets[0, -1] = 1
    scores = (rng.random(targets.shape) + 0.7 * targets) / 1.7
    if decimals is not None:
        scores = np.round(scores, decimals)  # many tied scores per class
    ap = per_class_ap(scores, targets, "sklearn")
    ref = np.array([average_precision_score(targets[:, c], scores[:, c]) for c in range(rates.size)])
    np.testing.assert_array_equal(ap, ref)  # same summation order: bit-identical
    res = evaluate(scores, targets, list("abcde"), scores_are_logits=False)
    assert res["map"] == pytest.approx(100 * ref.mean(), rel=1e-12)


def test_voc_variants_hand_computed():
    # Ranking (scores already descending): labels 1 0 0 1 1 -> three positives.
    # Precision/recall after each image: (1, 1/3) (1/2, 1/3) (1/3, 1/3) (1/2, 2/3) (3/5, 1).
    scores, y = [0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 0, 1, 1]
    # sklearn (no interpolation): precision at each positive, times the recall step 1/3:
    # (1 + 1/2 + 3/5) / 3 = 0.7
    assert average_precision(scores, y, "sklearn") == pytest.approx(0.7)
    # all-point envelope: at recall 2/3 the best precision at recall >= 2/3 is 3/5, not 1/2:
    # (1 + 3/5 + 3/5) / 3 = 2.2 / 3
    assert average_precision(scores, y, "voc_all_point") == pytest.approx(2.2 / 3)
    # 11 points t = 0, .1, ..., 1: max precision at recall >= t.
    # t in {0, .1, .2, .3} -> 1 (recall 1/3 >= .3); t in {.4, .5, .6} -> max(1/2, 3/5) = 3/5;
    # t in {.7, .8, .9, 1} -> 3/5.  AP = (4 * 1 + 7 * 3/5) / 11 = 8.2 / 11
    assert average_precision(scores, y, "voc07_11pt") == pytest.approx(8.2 / 11)


def test_voc07_11pt_recall_exactly_on_a_grid_point():
    # 10 positives ranked P P P, then 7 negatives, then 7 positives.
    # Recall 3/10 is reached at rank 3 with precision 1; the other precisions at recall >= 0.4 grow to 10/17
    # at rank 17. Points t = 0, .1, .2, .3 -> 1 (recall 3/10 counts as >= 0.3); t = .4 .. 1 -> 10/17.
    y = [1] * 3 + [0] * 7 + [1] * 7
    scores = np.arange(len(y))[::-1]
    assert average_precision(scores, y, "voc07_11pt") == pytest.approx((4 + 7 * 10 / 17) / 11)


def test_voc_variants_with_ties_hand_computed():
    # Scores 0.9, 0.5, 0.5, 0.1 with labels 0, 1, 0, 1: the two 0.5 images form one threshold.
    # Thresholds: >=0.9 -> P 0, R 0; >=0.5 -> P 1/3, R 1/2; >=0.1 -> P 1/2, R 1.
    scores, y = [0.9, 0.5, 0.5, 0.1], [0, 1, 0, 1]
    assert average_precision(scores, y, "sklearn") == pytest.approx(0.5 * 1 / 3 + 0.5 * 1 / 2)  # 5/12
    # envelope: precision 1/2 at every recall -> 1/2
    assert average_precision(scores, y, "voc_all_point") == pytest.approx(0.5)
    assert average_precision(scores, y, "voc07_11pt") == pytest.approx(0.5)
    # the order of tied images does not matter
    for variant in list_ap_variants():
        assert average_precision(scores[::-1], y[::-1], variant) == pytest.approx(average_precision(scores, y, variant))


@pytest.mark.parametrize("variant", ["sklearn", "voc_all_point", "voc07_11pt"])
def test_unknown_entries_are_left_out(variant):
    rng = np.random.default_rng(1)
    scores, y = rng.random(50), (rng.random(50) < 0.3).astype(int)
    y[0] = 1
    masked = y.copy()
    masked[::4] = -1
    keep = masked != -1
    assert average_precision(scores, masked, variant) == average_precision(scores[keep], y[keep], variant)
    assert np.isnan(average_precision(scores, np.zeros(50), variant))


def test_class_without_positive_excluded_and_listed():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(30, 3))
    targets = (rng.random((30, 3)) < 0.4).astype(int)
    targets[:, 0] = 1
    targets[:, 1] = 0  # 'b' has no positive ...
    targets[:3, 1] = -1  # ... and a few unknowns
    targets[0, 2] = -1
    res = evaluate(scores, targets, ["a", "b", "c"], group_counts=[200, 50, 5])
    assert res["no_positive_classes"] == ["b"] and res["per_class_ap"]["b"] is None
    ap_a, ap_c = res["per_class_ap"]["a"], res["per_class_ap"]["c"]
    assert res["map"] == pytest.approx((ap_a + ap_c) / 2)
    assert res["var"] == pytest.approx(np.var([ap_a, ap_c]))
    assert res["head"] == pytest.approx(ap_a) and res["medium"] is None and res["tail"] == pytest.approx(ap_c)
    assert res["group_sizes"] == {"head": 1, "medium": 0, "tail": 1}
    assert ap_c == pytest.approx(100 * average_precision(scores[1:, 2], targets[1:, 2]))
    table = format_table(res)
    assert "no positive test image (excluded): b" in table and f"{ap_a:.2f}" in table


def test_groups_from_voc_lt_train(shared_data):
    train, test = _labels(shared_data, "voc_lt", "train"), _labels(shared_data, "voc_lt", "test")
    assert len(train) == 1142
    rng = np.random.default_rng(3)
    logits = rng.normal(size=test.targets.shape) + 2.0 * test.targets
    res = evaluate(logits, test.targets, test.classnames, group_counts=train.class_counts())
    groups = np.array([res["groups"][n] for n in test.classnames])
    assert [int((groups == g).sum()) for g in ("head", "medium", "tail")] == [6, 6, 8]
    assert res["groups"]["person"] == "head" and res["groups"]["cow"] == "tail"
    ap = np.array([res["per_class_ap"][n] for n in test.classnames])
    for g in ("head", "medium", "tail"):
        assert res[g] == pytest.approx(ap[groups == g].mean())
    assert res["map"] == pytest.approx(ap.mean())
    table = format_table(res)
    assert table.splitlines()[-1].split() == ["classes", "20", "6", "6", "8"]
    assert f"{res['tail']:.2f}" in table and f"{res['var']:.2f}" in table


# ---------------------------------------------------------------------------- threshold metrics
PROBS = np.array([[0.9, 0.6, 0.1], [0.2, 0.7, 0.4], [0.8, 0.3, 0.55]])
TARGETS = np.array([[1, 0, 0], [1, 1, 1], [0, 1, 1]])


def test_threshold_metrics_hand_computed():
    # predicted (>= 0.5): row0 {0, 1}, row1 {1}, row2 {0, 2}
    # class 0: pred rows 0,2; positives rows 0,1 -> TP 1: P 1/2, R 1/2, F1 1/2
    # class 1: pred rows 0,1; positives rows 1,2 -> TP 1: P 1/2, R 1/2, F1 1/2
    # class 2: pred row 2;    positives rows 1,2 -> TP 1: P 1,   R 1/2, F1 2/3
    # CP = 2/3, CR = 1/2, CF1 = 2 CP CR / (CP + CR) = 4/7, mean F1 = 5/9
    # overall: TP 3, predicted 5, positives 6 -> OP 3/5, OR 1/2, OF1 = 0.6 / 1.1 = 6/11
    m = threshold_metrics(PROBS, TARGETS)
    expected = {"cp": 2 / 3, "cr": 1 / 2, "cf1": 4 / 7, "op": 3 / 5, "or": 1 / 2, "of1": 6 / 11}
    assert m == pytest.approx({k: 100 * v for k, v in expected.items()})
    assert threshold_metrics(PROBS, TARGETS, cf1="mean")["cf1"] == pytest.approx(100 * 5 / 9)
    # top-1: row0 -> 0, row1 -> 1, row2 -> 0.  class 0: P 1/2 R 1/2; class 1: P 1 R 1/2; class 2: none -> P 0 R 0
    top = threshold_metrics(PROBS, TARGETS, top_k=1)
    assert top["cp"] == pytest.approx(100 / 2) and top["cr"] == pytest.approx(100 / 3)
    assert top["op"] == pytest.approx(100 * 2 / 3) and top["or"] == pytest.approx(100 * 2 / 6)
    # an unknown entry counts neither as a false positive nor as a positive
    t = TARGETS.copy()
    t[0, 1] = -1  # was a false positive of class 1 -> class 1 precision 1
    assert threshold_metrics(PROBS, t)["cp"] == pytest.approx(100 * (1 / 2 + 1 + 1) / 3)
    # a probability equal to the threshold is a positive prediction; class 1 (no positive) is left out
    assert threshold_metrics([[0.5, 0.2]], [[1, 0]])["cr"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="CF1"):
        threshold_metrics(PROBS, TARGETS, cf1="geometric")


def test_logits_and_probabilities_give_the_same_result():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(40, 5)) * 3
    logits[np.abs(logits) < 1e-6] = 1.0  # keep away from the threshold itself
    targets = (rng.random((40, 5)) < 0.4).astype(int)
    probs = torch.sigmoid(torch.from_numpy(logits)).numpy()
    np.testing.assert_allclose(sigmoid(logits), probs, rtol=1e-12)
    kw = dict(classnames=list("abcde"), top_k=2)
    a = evaluate(logits, targets, scores_are_logits=True, **kw)
    b = evaluate(probs, targets, scores_are_logits=False, **kw)
    assert a.keys() == b.keys() and "cf1_top2" in a
    for k in a:
        assert a[k] == pytest.approx(b[k]), k
    with pytest.raises(ValueError, match="outside"):
        evaluate(logits, targets, scores_are_logits=False, **kw)


# ------------------------------------------------------------------------------------ Evaluator
def test_evaluator_batches_equal_one_shot_and_reset():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(103, 4)).astype(np.float32)
    targets = (rng.random((103, 4)) < 0.3).astype(np.int64)
    targets[rng.random((103, 4)) < 0.1] = -1
    names, counts = ["w", "x", "y", "z"], [150, 40, 10, 500]
    ev = Evaluator(4, names, group_counts=counts, top_k=2)
    for lo in range(0, 103, 16):
        ev.update(torch.from_numpy(logits[lo : lo + 16]), torch.from_numpy(targets[lo : lo + 16]).float())
    res = ev.compute()
    assert res == evaluate(logits, targets, names, counts, top_k=2)
    assert res["num_images"] == 103 and set(res["per_class_ap"]) == set(names)
    json.dumps(res)  # plain Python values
    ev.reset()
    ev.update(logits[:10], targets[:10])
    assert ev.compute() == evaluate(logits[:10], targets[:10], names, counts, top_k=2)
    with pytest.raises(ValueError, match="classes"):
        ev.update(logits[:, :3], targets[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        ev.update(np.full((1, 4), np.nan), targets[:1])  # a diverged model is reported, not ranked


# ------------------------------------------------------------------------------------ read_scores
def test_read_scores_formats(tmp_path):
    arr = np.arange(6, dtype=np.float64).reshape(3, 2) / 7
    np.save(tmp_path / "s.npy", arr)
    np.savetxt(tmp_path / "s.csv", arr, delimiter=",")
    np.savetxt(tmp_path / "s.txt", arr)
    for name in ("s.npy", "s.csv", "s.txt"):
        np.testing.assert_allclose(read_scores(tmp_path / name, 3, 2), arr, rtol=1e-15)


def test_read_scores_errors(tmp_path):
    good = np.zeros((3, 2))
    cases = {}
    cases["missing.npy"] = ("not found", None)
    (tmp_path / "garbage.npy").write_bytes(b"not an npy file")
    cases["garbage.npy"] = ("cannot read", None)
    (tmp_path / "words.csv").write_text("a,b\nc,d\n")
    cases["words.csv"] = ("cannot read", None)
    np.save(tmp_path / "shape.npy", np.zeros((2, 2)))
    cases["shape.npy"] = (r"expected shape \(3, 2\).*label-list order.*got \(2, 2\)", None)
    nan = good.copy()
    nan[1, 1] = np.nan
    nan[2, 0] = np.inf
    np.save(tmp_path / "nan.npy", nan)
    cases["nan.npy"] = ("2 NaN or inf entries .first at row 1, column 1", None)
    (tmp_path / "s.json").write_text("[]")
    cases["s.json"] = ("unsupported", None)
    for name, (pattern, _) in cases.items():
        with pytest.raises(ScoreFileError, match=pattern) as info:
            read_scores(tmp_path / name, 3, 2)
        assert name in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, shards: list, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ev = Evaluator(3, ["a", "b", "c"], group_counts=[300, 30, 3], top_k=1)
        scores, targets = shards[rank]
        for lo in range(0, len(scores), 7):  # several batches per rank
            ev.update(torch.from_numpy(scores[lo : lo + 7]), torch.from_numpy(targets[lo : lo + 7]))
        res = ev.compute()
        with open(f"{out}.{rank}", "w") as fh:
            json.dump(res, fh)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_gather_unequal_shards(tmp_path):
    rng = np.random.default_rng(6)
    scores = rng.normal(size=(50, 3))
    targets = (rng.random((50, 3)) < 0.4).astype(np.int64)
    targets[rng.random((50, 3)) < 0.1] = -1
    shards = [(scores[:19], targets[:19]), (scores[19:], targets[19:])]  # 19 and 31 rows
    out = str(tmp_path / "res")
    torch.multiprocessing.spawn(_ddp_worker, args=(_free_port(), shards, out), nprocs=2, join=True)
    expected = json.loads(json.dumps(evaluate(scores, targets, ["a", "b", "c"], [300, 30, 3], top_k=1)))
    for rank in range(2):
        with open(f"{out}.{rank}") as fh:
            assert json.load(fh) == expected
