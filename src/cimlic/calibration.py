"""Calibrated probabilities and per-class decision thresholds, chosen on a validation split.

A trained run scores class c of an image with a logit z_c. Two things turn it into a tagger's decision:

* **calibration** **[our design]**: p_c = sigmoid(a * z_c + b_c), one slope ``a`` shared by every class and one
  intercept ``b_c`` per class, fitted on the validation split by an L2-regularised logistic regression of the known
  labels on the logits (Platt scaling with a shared slope). A CLIP-scaled cosine model (z ~ 100 cos) has
  sigmoid(z) ~ 1 for every class; the fit brings the scores back to probabilities near each class's rate. The
  penalty pulls the intercept of a class with few validation labels towards the common one (a tail class with one
  validation positive cannot move it far), and weighs less as the split grows.
* **thresholds**: per class, on p_c, chosen on the same split by ``rule``:

  - ``f1`` (default): the threshold of the largest F1 of that class on the split;
  - ``precision``: the threshold of the largest recall whose precision is at least ``target_precision``
    (the highest precision reached when none reaches it; the class is then flagged).

  A threshold lies half-way (in a * z + b) between the last score labelled positive and the next one, so it does
  not sit on a validation image's score. A class without a positive validation image keeps p >= 0.5 (flagged).

Both are monotone per class, so the ranking, and with it every AP, is unchanged.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cimlic.errors import ConfigError
from cimlic.io import read_json, write_json

logger = logging.getLogger(__name__)

RULES = ("f1", "precision")
FALLBACK_PROBABILITY = 0.5  # the threshold of a class the split cannot inform


@dataclass
class Calibration:
    """What ``calibration.json`` of a run holds (see the module docstring).

    Attributes:
        classnames: the C class names, in the model's order.
        scale, bias: p_c = sigmoid(scale * z_c + bias[c]) (one bias per class).
        thresholds: (C,) decision thresholds on p_c; a class is predicted when p_c >= its threshold.
        rule: "f1" or "precision"; ``target_precision`` the precision asked for with "precision".
        split: the split they were chosen on, and its image count ``images``.
        per_class: for each class, what the split showed at its threshold (positives, precision, recall, f1, note).
    """

    classnames: list[str]
    scale: float
    bias: list[float]
    thresholds: list[float]
    rule: str = "f1"
    target_precision: float | None = None
    split: str = "val"
    images: int = 0
    per_class: list[dict] = field(default_factory=list)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """(N, C) calibrated probabilities of (N, C) logits (float64)."""
        return _sigmoid(self.scale * np.asarray(logits, dtype=np.float64) + np.asarray(self.bias))

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike, classnames: Sequence[str] | None = None) -> Calibration:
        """Read ``calibration.json``; ConfigError naming the file when it is malformed or for other classes."""
        path = Path(path)
        data = read_json(path, ConfigError, "calibration file")
        try:
            cal = cls(**data)
            thresholds, bias = [float(t) for t in cal.thresholds], [float(b) for b in cal.bias]
            ok = len(thresholds) == len(bias) == len(cal.classnames) and all(0.0 <= t <= 1.0 for t in thresholds)
            ok = ok and all(math.isfinite(v) for v in (float(cal.scale), *bias)) and float(cal.scale) > 0
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{path}: not a calibration file ({err})") from None
        if not ok:
            raise ConfigError(f"{path}: needs one threshold in [0, 1] and one finite bias per class, a scale > 0")
        if classnames is not None and list(cal.classnames) != list(classnames):
            raise ConfigError(f"{path}: calibrated for other classes than the run's ({len(cal.classnames)} names)")
        cal.thresholds, cal.scale, cal.bias = thresholds, float(cal.scale), bias
        return cal


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def fit_platt(logits: np.ndarray, targets: np.ndarray, penalty: float = 1.0) -> tuple[float, np.ndarray]:
    """(a, b) of p_c = sigmoid(a z_c + b_c) fitted on the known entries (targets 0/1; -1 left out).

    One logistic regression over every known (image, class) entry: the standardised logit and a one-hot of the class
    as features, an unpenalised common intercept (sklearn, lbfgs). ``penalty`` = 1 / sklearn's C: the L2 weight on the
    per-class offsets (and the slope), against the summed log-loss of the entries. Falls back to standardising the
    logits (a = 1/std, b_c = -mean/std) when the split has one label value only, or the fit gives a slope <= 0 (scores
    that rank the wrong way round); logged.

    Returns:
        (a, (C,) b).
    """
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression

    z, y = np.asarray(logits, dtype=np.float64), np.asarray(targets)
    C = z.shape[1]
    rows, cols = np.nonzero(y != -1)  # known entries
    z_known, labels = z[rows, cols], (y[rows, cols] == 1).astype(np.int64)
    mean, std = (float(z_known.mean()), float(z_known.std())) if z_known.size else (0.0, 1.0)
    std = std if std > 1e-12 else 1.0
    standardised = (1.0 / std, np.full(C, -mean / std))
    if z_known.size == 0 or labels.min() == labels.max():
        logger.warning("calibration: the split has %s; scores are standardised instead of fitted",
                       "no known label" if z_known.size == 0 else "one label value only")  # fmt: skip
        return standardised
    features = sparse.hstack([sparse.csr_matrix(((z_known - mean) / std)[:, None]),
                              sparse.csr_matrix((np.ones(cols.size), (np.arange(cols.size), cols)), (cols.size, C))],
                             format="csr")  # fmt: skip  # (n_known, 1 + C)
    model = LogisticRegression(C=1.0 / penalty, max_iter=2000).fit(features, labels)
    w, offsets, c = float(model.coef_[0, 0]), model.coef_[0, 1:], float(model.intercept_[0])
    if w <= 0:
        logger.warning("calibration: the logits rank the validation labels the wrong way round (slope %.3g); "
                       "scores are standardised instead of fitted", w)  # fmt: skip
        return standardised
    return w / std, c + offsets - w * mean / std


def choose_threshold(
    scores: np.ndarray, positive: np.ndarray, rule: str = "f1", target_precision: float | None = None
) -> tuple[float | None, dict]:
    """The threshold on ``scores`` (one class, known entries only) by ``rule``, and what the split shows there.

    Returns:
        (threshold, {"positives", "precision", "recall", "f1", "note"}); threshold None when the split has no
        positive (the caller keeps its fallback).
    """
    s, pos = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos = int(pos.sum())
    if n_pos == 0:
        return None, {"positives": 0, "precision": None, "recall": None, "f1": None,
                      "note": "no positive validation image: threshold 0.5"}  # fmt: skip
    order = np.argsort(-s, kind="stable")
    s, pos = s[order], pos[order]
    cut = np.r_[np.flatnonzero(np.diff(s) < 0), s.size - 1]  # last index of each distinct score (tied scores: one cut)
    k = cut + 1  # images labelled positive at each cut
    tp = np.cumsum(pos)[cut]
    precision, recall = tp / k, tp / n_pos
    f1 = 2 * tp / (k + n_pos)
    note = ""
    if rule == "f1":
        best = int(np.argmax(f1))  # the first maximum: the highest threshold of the best F1
    elif rule == "precision":
        if target_precision is None:
            raise ConfigError("rule 'precision' needs a target precision")
        reached = np.flatnonzero(precision >= target_precision)
        if reached.size:
            best = int(reached[-1])  # the largest recall that keeps the precision
        else:
            best = int(np.flatnonzero(precision == precision.max())[-1])
            note = f"target precision {target_precision:g} not reached on the split (best {precision[best]:.3f})"
    else:
        raise ConfigError(f"unknown threshold rule {rule!r}; valid: {list(RULES)}")
    last = cut[best]
    below = s[last + 1] if last + 1 < s.size else s[last] - 1.0
    stats = {"positives": n_pos, "precision": float(precision[best]), "recall": float(recall[best]),
             "f1": float(f1[best]), "note": note}  # fmt: skip
    return float((s[last] + below) / 2), stats


def calibrate(
    logits: np.ndarray,
    targets: np.ndarray,
    classnames: Sequence[str],
    rule: str = "f1",
    target_precision: float | None = None,
    split: str = "val",
) -> Calibration:
    """Fit (a, b) and choose per-class thresholds on (N, C) ``logits`` and their (N, C) ``targets`` in {1, 0, -1}."""
    if rule not in RULES:
        raise ConfigError(f"unknown threshold rule {rule!r}; valid: {list(RULES)}")
    if rule == "precision" and not (target_precision is not None and 0.0 < target_precision <= 1.0):
        raise ConfigError(f"--target-precision must be in (0, 1], got {target_precision}")
    z, t = np.asarray(logits, dtype=np.float64), np.asarray(targets)
    if z.shape != t.shape or z.ndim != 2 or z.shape[1] != len(classnames):
        raise ConfigError(f"calibration: logits {z.shape}, targets {t.shape} and {len(classnames)} classes disagree")
    a, b = fit_platt(z, t)
    u = a * z + b  # (N, C) calibrated logits: thresholds are chosen here, then mapped to probabilities
    thresholds, per_class = [], []
    for c, name in enumerate(classnames):
        known = t[:, c] != -1
        cut, stats = choose_threshold(u[known, c], t[known, c] == 1, rule, target_precision)
        p = FALLBACK_PROBABILITY if cut is None else float(_sigmoid(np.float64(cut)))
        thresholds.append(p)
        per_class.append({"class": name, "threshold": p, **stats})
    flagged = [d["class"] for d in per_class if d["note"]]
    if flagged:
        logger.warning("thresholds of %d class(es) could not be set as asked (see calibration.json): %s",
                       len(flagged), ", ".join(flagged[:8]) + (", ..." if len(flagged) > 8 else ""))  # fmt: skip
    return Calibration(list(classnames), float(a), [float(v) for v in b], thresholds, rule, target_precision, split,
                       int(z.shape[0]), per_class)  # fmt: skip
