"""Per-class thresholds and the two-parameter calibration (cimlic.calibration), against analytic optima."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import average_precision_score

from cimlic.calibration import Calibration, calibrate, choose_threshold, fit_platt
from cimlic.errors import ConfigError

MU_POS, MU_NEG, PRIOR = 2.0, 0.0, 0.1  # positives ~ N(2, 1), negatives ~ N(0, 1), 10 % positives


def _gaussian_class(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    positive = rng.random(n) < PRIOR
    return np.where(positive, rng.normal(MU_POS, 1.0, n), rng.normal(MU_NEG, 1.0, n)), positive


def _population(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(F1(t), precision(t)) of the score distributions above, labelling s >= t positive."""
    tp, fp = PRIOR * norm.sf(t - MU_POS), (1 - PRIOR) * norm.sf(t - MU_NEG)
    return 2 * tp / (PRIOR + tp + fp), tp / (tp + fp)


GRID = np.linspace(-2.0, 6.0, 80_001)


def test_f1_threshold_matches_the_analytic_optimum():
    scores, positive = _gaussian_class(400_000, seed=0)
    threshold, stats = choose_threshold(scores, positive, "f1")
    f1, _ = _population(GRID)
    optimum = GRID[np.argmax(f1)]  # about 1.87 for these distributions
    assert abs(threshold - optimum) < 0.05, (threshold, optimum)
    assert stats["f1"] == pytest.approx(f1.max(), abs=0.01)
    assert stats["positives"] == int(positive.sum()) and stats["note"] == ""


@pytest.mark.parametrize("target", [0.5, 0.8])
def test_precision_threshold_matches_the_analytic_optimum(target):
    scores, positive = _gaussian_class(400_000, seed=1)
    threshold, stats = choose_threshold(scores, positive, "precision", target)
    _, precision = _population(GRID)
    optimum = GRID[np.flatnonzero(precision >= target)[0]]  # precision rises with t: the lowest t that reaches it
    assert abs(threshold - optimum) < 0.06, (threshold, optimum)
    assert stats["precision"] >= target and stats["precision"] == pytest.approx(target, abs=0.01)


def test_thresholds_by_hand():
    # F1 at k = 1..5 labelled: 2/3, 2/4, 4/5, 4/6, 4/7 -> k = 3, half-way between 0.7 and 0.6
    scores, positive = np.array([0.5, 0.9, 0.6, 0.7, 0.8]), np.array([0, 1, 0, 1, 0], dtype=bool)
    threshold, stats = choose_threshold(scores, positive, "f1")
    assert threshold == pytest.approx(0.65) and stats["f1"] == pytest.approx(0.8)
    assert (stats["precision"], stats["recall"]) == (pytest.approx(2 / 3), 1.0)
    # tied scores are one cut: k = 2 (F1 0.5) or k = 3 (F1 0.8; half-way between 0.1 and 0.1 - 1: -0.4)
    threshold, _ = choose_threshold(np.array([0.9, 0.9, 0.1]), np.array([1, 0, 1], dtype=bool), "f1")
    assert threshold == pytest.approx(-0.4)
    # precision 1.0 is reached only by the top image: recall 1/2
    threshold, stats = choose_threshold(scores, positive, "precision", 1.0)
    assert threshold == pytest.approx(0.85) and stats["recall"] == 0.5
    # never reached (0 at k = 1, 1/2 at k = 2): the highest precision is kept and the class flagged
    threshold, stats = choose_threshold(np.array([0.9, 0.8]), np.array([0, 1], dtype=bool), "precision", 0.9)
    assert threshold == pytest.approx(0.3) and stats["precision"] == 0.5 and "not reached" in stats["note"]
    assert choose_threshold(scores, np.zeros(5, dtype=bool))[0] is None


def test_platt_fit_recovers_the_generating_scale_and_biases():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, (20_000, 5))
    bias = np.array([-1.0, -2.0, 0.0, -3.0, 0.5])
    targets = (rng.random(logits.shape) < 1 / (1 + np.exp(-(0.5 * logits + bias)))).astype(np.int8)
    targets[:100, 0] = -1  # unknown entries are left out
    a, b = fit_platt(logits, targets)
    assert a == pytest.approx(0.5, abs=0.02) and b == pytest.approx(bias, abs=0.06)
    a, b = fit_platt(np.array([[1.0, 3.0]]), np.zeros((1, 2), dtype=np.int8))  # one label value: standardised
    assert a == pytest.approx(1.0) and b == pytest.approx([-2.0, -2.0])
    # a class with one positive among 20 validation images: its bias is pulled towards the others', not to +-inf
    few = rng.normal(0.0, 3.0, (20, 3))
    labels = (rng.random((20, 3)) < 0.4).astype(np.int8)
    labels[:, 2], labels[0, 2] = 0, 1
    few[0, 2] = -5.0  # the one positive scores low: unpenalised, b_2 would have to rise far
    _, b = fit_platt(few, labels)
    assert abs(b[2] - b[:2].mean()) < 4.0


def test_a_clip_scaled_model_is_calibrated_and_labels_what_is_there():
    """Logits ~ 100 cos with cos around 0.25 for every class: sigmoid labels everything; calibrated, about the truth."""
    rng = np.random.default_rng(0)
    targets = (rng.random((3000, 6)) < np.linspace(0.4, 0.02, 6)).astype(np.int8)  # long-tailed
    cos = 0.25 + 0.03 * targets + rng.normal(0, 0.01, targets.shape) + np.linspace(0, 0.02, 6)  # class offsets
    logits = 100 * cos
    assert (1 / (1 + np.exp(-logits)) >= 0.5).all()  # the fixed 0.5 on sigmoid: every class on every image
    names = [f"c{i}" for i in range(6)]
    cal = calibrate(logits[:1500], targets[:1500], names)
    probs = cal.probabilities(logits[1500:])
    predicted = probs >= np.array(cal.thresholds)
    assert predicted.sum() == pytest.approx(targets[1500:].sum(), rel=0.15)
    f1 = 2 * (predicted & (targets[1500:] == 1)).sum(0) / (predicted.sum(0) + targets[1500:].sum(0))
    best = [choose_threshold(logits[1500:, c], targets[1500:, c] == 1)[1]["f1"] for c in range(6)]  # oracle on test
    assert (f1 > np.array(best) - 0.08).all() and f1.min() > 0.7, (f1, best)
    assert np.mean(np.abs(probs.mean(0) - targets[1500:].mean(0))) < 0.05  # probabilities near the base rates
    for c in range(6):  # monotone per class: the ranking and every AP are unchanged
        assert average_precision_score(targets[1500:, c], probs[:, c]) == pytest.approx(
            average_precision_score(targets[1500:, c], logits[1500:, c])
        )


def test_classes_without_positives_keep_the_fallback_and_are_flagged(caplog):
    logits = np.random.default_rng(0).normal(size=(50, 3))
    targets = np.zeros((50, 3), dtype=np.int8)
    targets[:25, 0] = 1
    targets[:10, 1] = 1
    cal = calibrate(logits, targets, ["a", "b", "c"])
    assert cal.thresholds[2] == 0.5 and "no positive" in cal.per_class[2]["note"]
    assert "could not be set" in caplog.text and "c" in caplog.text


def test_calibration_file_round_trip_and_errors(tmp_path):
    cal = calibrate(np.random.default_rng(0).normal(size=(40, 2)), np.eye(2, dtype=np.int8)[np.arange(40) % 2],
                    ["a", "b"])  # fmt: skip
    path = tmp_path / "calibration.json"
    cal.save(path)
    back = Calibration.load(path, ["a", "b"])
    assert back == cal
    with pytest.raises(ConfigError, match="calibration.json: calibrated for other classes"):
        Calibration.load(path, ["b", "a"])
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data | {"thresholds": [0.5, 1.5]}))
    with pytest.raises(ConfigError, match=r"calibration.json: needs one threshold in \[0, 1\] and one finite bias"):
        Calibration.load(path)
    path.write_text(json.dumps(data | {"colour": 1}))
    with pytest.raises(ConfigError, match="calibration.json: not a calibration file"):
        Calibration.load(path)
    with pytest.raises(ConfigError, match="target-precision"):
        calibrate(np.zeros((2, 1)), np.ones((2, 1), dtype=np.int8), ["a"], "precision", 1.5)
