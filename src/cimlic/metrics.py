"""Multi-label evaluation (METHODS §2): AP variants, head/medium/tail mAP, the F1 family, an Evaluator.

All numbers in a result dict are percentages (0-100), as papers report them. Targets are in {1, 0, -1};
-1 (unknown) entries are left out of their class's ranking and counts. A class with no positive test
image has no AP: it is excluded from every mean (AP, group means, variance, CP/CR/CF1/OP/OR/OF1) and
listed under ``no_positive_classes``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cimlic.data.labels import GROUPS, class_groups
from cimlic.distributed import all_gather_cat, collective_device, is_distributed
from cimlic.errors import CimlicError, ConfigError

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor | Sequence


class ScoreFileError(CimlicError, ValueError):
    """A score file is missing, unreadable, of the wrong shape or holds NaN/inf (the message names the file)."""


# --------------------------------------------------------------------------------------------- AP
def _pr_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at every distinct score, from the highest score down.

    Tied scores form one threshold (as in sklearn), so the result does not depend on the image order.
    """
    order = np.argsort(scores, kind="mergesort")[::-1]
    s, y = scores[order], positive[order].astype(np.float64)
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # index of each threshold's last image
    tps = np.cumsum(y)[last_of_tie]
    fps = 1 + last_of_tie.astype(np.float64) - tps
    return tps / (tps + fps), tps / tps[-1]  # precision, recall


def _ap_sklearn(precision: np.ndarray, recall: np.ndarray) -> float:
    # Step integral sum_k (R_k - R_{k-1}) P_k, summed in sklearn's order (recall decreasing) so the
    # floating-point result is the same as average_precision_score.
    p, r = np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0]
    return float(max(0.0, -np.sum(np.diff(r) * p[:-1])))


def _ap_voc_all_point(precision: np.ndarray, recall: np.ndarray) -> float:
    mrec, mpre = np.r_[0.0, recall, 1.0], np.r_[0.0, precision, 0.0]
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # monotone envelope: best precision at recall >= r
    step = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def _ap_voc07_11pt(precision: np.ndarray, recall: np.ndarray) -> float:
    # k / 10 (not arange(0, 1.1, 0.1)) so that t = 0.3 is the same double as a recall of 3/10.
    points = [precision[recall >= k / 10].max(initial=0.0) for k in range(11)]
    return float(np.mean(points))


_AP_VARIANTS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "sklearn": _ap_sklearn,  # non-interpolated (sklearn.metrics.average_precision_score)
    "voc_all_point": _ap_voc_all_point,  # area under the monotone precision envelope (VOC2010+)
    "voc07_11pt": _ap_voc07_11pt,  # mean interpolated precision at recall 0, 0.1, ..., 1 (VOC2007)
}


def list_ap_variants() -> list[str]:
    """Names of the AP variants ``average_precision`` accepts."""
    return list(_AP_VARIANTS)


def _check_variant(variant: str) -> Callable[[np.ndarray, np.ndarray], float]:
    if variant not in _AP_VARIANTS:
        raise ConfigError(f"unknown AP variant {variant!r}; valid: {list_ap_variants()}")
    return _AP_VARIANTS[variant]


def average_precision(scores: ArrayLike, targets: ArrayLike, variant: str = "sklearn") -> float:
    """Average precision of one class (a fraction in [0, 1]).

    Args:
        scores: (N,) ranking scores (logits or probabilities: AP only uses the order).
        targets: (N,) labels in {1, 0, -1}; -1 entries are left out of the ranking.
        variant: one of ``list_ap_variants()``.

    Returns:
        The AP, or NaN when no known positive is present.
    """
    fn = _check_variant(variant)
    s, t = _to_numpy(scores).reshape(-1), _to_numpy(targets).reshape(-1)
    if s.shape != t.shape:
        raise ValueError(f"scores {s.shape} and targets {t.shape} differ in length")
    known = t != -1
    s, pos = s[known], t[known] == 1
    if not pos.any():
        return float("nan")
    return fn(*_pr_curve(s, pos))


def per_class_ap(scores: ArrayLike, targets: ArrayLike, variant: str = "sklearn") -> np.ndarray:
    """(C,) AP of every column of (N, C) scores and targets; NaN for a class with no known positive."""
    s, t = _check_matrices(scores, targets)
    _check_variant(variant)
    return np.array([average_precision(s[:, c], t[:, c], variant) for c in range(s.shape[1])], dtype=np.float64)


def _check_matrices(scores: ArrayLike, targets: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s, t = _to_numpy(scores), _to_numpy(targets)
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(f"scores {s.shape} and targets {t.shape} must both be (N, C)")
    if not np.isin(t, (-1, 0, 1)).all():
        raise ValueError("targets must be in {1, 0, -1}")
    if not np.isfinite(s).all():
        raise ValueError(f"scores contain {int((~np.isfinite(s)).sum())} NaN or inf entries")
    return s, t.astype(np.int8)


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------- threshold metrics
def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function (element-wise; never a softmax across classes)."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def threshold_metrics(
    probs: ArrayLike, targets: ArrayLike, threshold: float = 0.5, top_k: int = 0, cf1: str = "harmonic"
) -> dict[str, float]:
    """CP, CR, CF1, OP, OR, OF1 in percent.

    A label is predicted when its probability is >= ``threshold`` or, with ``top_k > 0``, when it is among
    the image's k highest scores (ties go to the lower class index). Entries with target -1 are left out;
    only classes with a known positive count. A class with no predicted label has precision 0.

    Args:
        probs: (N, C) probabilities (apply ``sigmoid`` to logits first).
        targets: (N, C) labels in {1, 0, -1}.
        threshold: probability threshold tau (ignored when ``top_k > 0``).
        top_k: predict the k highest-scoring labels of each image instead of thresholding.
        cf1: 'harmonic' = 2 CP CR / (CP + CR); 'mean' = mean over classes of the per-class F1.
    """
    if cf1 not in ("harmonic", "mean"):
        raise ConfigError(f"unknown CF1 definition {cf1!r}; valid: ['harmonic', 'mean']")
    p, t = _check_matrices(probs, targets)
    if top_k > 0:
        top = np.argsort(-p, axis=1, kind="stable")[:, :top_k]  # (N, k)
        pred = np.zeros(p.shape, dtype=bool)
        np.put_along_axis(pred, top, True, axis=1)
    else:
        pred = p >= threshold
    known, pos = t != -1, t == 1
    cols = pos.sum(axis=0) > 0  # classes that have an AP
    pred, known, pos = pred[:, cols], known[:, cols], pos[:, cols]
    tp = (pred & pos).sum(axis=0)
    n_pred, n_pos = (pred & known).sum(axis=0), pos.sum(axis=0)
    prec_c, rec_c = _ratio(tp, n_pred), _ratio(tp, n_pos)
    f1_c = _ratio(2 * prec_c * rec_c, prec_c + rec_c)
    cp, cr, mean_f1 = (float(x.mean()) if x.size else 0.0 for x in (prec_c, rec_c, f1_c))
    cf1_value = float(_ratio(2 * cp * cr, cp + cr)) if cf1 == "harmonic" else mean_f1
    op, orec = float(_ratio(tp.sum(), n_pred.sum())), float(_ratio(tp.sum(), n_pos.sum()))
    of1 = float(_ratio(2 * op * orec, op + orec))
    out = {"cp": cp, "cr": cr, "cf1": cf1_value, "op": op, "or": orec, "of1": of1}
    return {k: 100.0 * v for k, v in out.items()}


# ------------------------------------------------------------------------------------- evaluation
def _mean_or_none(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if values.size else None


def _group_stats(
    ap: np.ndarray, names: list[str], group_counts: ArrayLike | None, head: int, tail: int
) -> tuple[dict[str, str], dict[str, float | None], dict[str, int]]:
    """Groups (name -> group), mean AP and number of evaluated classes of each group (NaN APs left out)."""
    if group_counts is None:
        return {}, dict.fromkeys(GROUPS), dict.fromkeys(GROUPS, 0)
    counts = np.asarray(group_counts).reshape(-1)
    if counts.size != len(names):
        raise ValueError(f"{counts.size} training counts for {len(names)} classes")
    g = class_groups(counts, head=head, tail=tail)  # (C,)
    sel = {name: (g == name) & ~np.isnan(ap) for name in GROUPS}
    means = {name: _mean_or_none(ap[m]) for name, m in sel.items()}
    return dict(zip(names, g.tolist(), strict=True)), means, {name: int(m.sum()) for name, m in sel.items()}


def evaluate(
    scores: ArrayLike,
    targets: ArrayLike,
    classnames: Sequence[str],
    group_counts: ArrayLike | None = None,
    ap_variant: str = "sklearn",
    threshold: float = 0.5,
    cf1: str = "harmonic",
    top_k: int = 0,
    scores_are_logits: bool = True,
    head_threshold: int = 100,
    tail_threshold: int = 20,
    ap_scores: str = "logits",
) -> dict[str, Any]:
    """Every metric of METHODS §2 over (N, C) scores and targets, in percent (see ``Evaluator``).

    ``ap_scores="class_softmax"`` ranks each class by the softmax of the logits *across classes* (the released LMPT
    evaluation; not a multi-label score, METHODS §2), for reproducing published numbers only; the threshold metrics
    keep the sigmoid.
    """
    s, t = _check_matrices(scores, targets)
    if s.shape[1] != len(classnames):
        raise ValueError(f"scores have {s.shape[1]} columns but {len(classnames)} class names were given")
    if not scores_are_logits and s.size and (s.min() < 0.0 or s.max() > 1.0):
        raise ConfigError("scores_are_logits=False but some scores are outside [0, 1]")
    if ap_scores not in AP_SCORES:
        raise ConfigError(f"unknown ap_scores {ap_scores!r}; valid: {list(AP_SCORES)}")
    if ap_scores == "class_softmax" and not scores_are_logits:
        raise ValueError("ap_scores=class_softmax needs logits (scores_are_logits=True)")
    ranked = class_softmax(s) if ap_scores == "class_softmax" else s
    ap = 100.0 * per_class_ap(ranked, t, ap_variant)  # (C,) in percent, NaN = no positive
    has_ap = ~np.isnan(ap)
    names = list(classnames)
    missing = [n for n, ok in zip(names, has_ap, strict=True) if not ok]
    if missing:
        logger.info("%d class(es) without a positive test image excluded from the means: %s", len(missing), missing)
    groups, group_means, group_sizes = _group_stats(ap, names, group_counts, head_threshold, tail_threshold)
    probs = sigmoid(s) if scores_are_logits else s
    result: dict[str, Any] = {
        "ap_variant": ap_variant,
        "ap_scores": ap_scores,
        "num_images": int(s.shape[0]),
        "num_classes": len(names),
        "map": _mean_or_none(ap[has_ap]),
        **group_means,
        "var": float(np.var(ap[has_ap])) if has_ap.any() else None,  # population variance, AP in %
        "per_class_ap": {n: (float(a) if ok else None) for n, a, ok in zip(names, ap, has_ap, strict=True)},
        "no_positive_classes": missing,
        "groups": groups,
        "group_sizes": group_sizes,
        "threshold": threshold,
        "cf1_definition": cf1,
        **threshold_metrics(probs, t, threshold=threshold, cf1=cf1),
    }
    if top_k > 0:
        top = threshold_metrics(probs, t, top_k=top_k, cf1=cf1)
        result.update({f"{k}_top{top_k}": v for k, v in top.items()})
    return result


AP_SCORES = ("logits", "class_softmax")


def class_softmax(logits: np.ndarray) -> np.ndarray:
    """(N, C) softmax of each row across the classes (numerically stable)."""
    z = np.exp(logits - logits.max(axis=1, keepdims=True)) if logits.size else logits
    return z / z.sum(axis=1, keepdims=True) if logits.size else z


class Evaluator:
    """Accumulates scores and targets over batches and computes every metric over all of them.

    mAP cannot be averaged per batch, so ``update`` only stores (on the CPU) and ``compute`` ranks
    everything seen. Under an initialised ``torch.distributed`` process group, ``compute`` is a
    collective call: every rank must call it; it all-gathers the rows of every rank (unequal counts
    allowed) and returns the same result on every rank.

    ``compute()`` returns a dict (values in percent): ``map``, ``head``, ``medium``, ``tail`` (None when
    the group has no evaluated class or no training counts were given), ``var`` (population variance
    ``np.var`` of the per-class APs in %, i.e. in AP² percentage points, as HP-DVAL reports it),
    ``per_class_ap`` (name -> AP or None), ``no_positive_classes``, ``groups`` (name -> group),
    ``group_sizes`` (group -> number of evaluated classes), ``ap_variant``, ``num_images``,
    ``num_classes``, ``threshold``, ``cf1_definition``, ``cp``, ``cr``, ``cf1``, ``op``, ``or``, ``of1``
    and, with ``top_k > 0``, the same six with a ``_top{k}`` suffix.

    Args:
        num_classes: C.
        classnames: the C class names (keys of ``per_class_ap``).
        group_counts: (C,) n_c of the full training list, which define the head/medium/tail groups (METHODS §1.2
            step 5).
        ap_variant: one of ``list_ap_variants()``.
        threshold: probability threshold of CP/CR/CF1/OP/OR/OF1.
        cf1: 'harmonic' or 'mean' (see ``threshold_metrics``).
        top_k: also report top-k threshold metrics when > 0.
        scores_are_logits: True if ``update`` receives logits (a sigmoid is applied), False for probabilities.
        head_threshold: head classes have n_c >= this.
        tail_threshold: tail classes have n_c < this.
        ap_scores: ``logits`` or ``class_softmax`` (the released LMPT evaluation, see ``evaluate``).
    """

    def __init__(
        self,
        num_classes: int,
        classnames: Sequence[str],
        group_counts: ArrayLike | None = None,
        ap_variant: str = "sklearn",
        threshold: float = 0.5,
        cf1: str = "harmonic",
        top_k: int = 0,
        scores_are_logits: bool = True,
        head_threshold: int = 100,
        tail_threshold: int = 20,
        ap_scores: str = "logits",
    ) -> None:
        if len(classnames) != num_classes:
            raise ValueError(f"{len(classnames)} class names for num_classes={num_classes}")
        _check_variant(ap_variant)
        self.num_classes, self.classnames = num_classes, list(classnames)
        self.group_counts = None if group_counts is None else _to_numpy(group_counts).astype(np.int64)
        self.options = dict(
            ap_variant=ap_variant, threshold=threshold, cf1=cf1, top_k=top_k, scores_are_logits=scores_are_logits
        )
        self.options.update(head_threshold=head_threshold, tail_threshold=tail_threshold, ap_scores=ap_scores)
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen."""
        self._scores: list[np.ndarray] = []
        self._targets: list[np.ndarray] = []

    def update(self, scores: ArrayLike, targets: ArrayLike) -> None:
        """Store a batch: scores (B, C) (logits or probabilities, see ``scores_are_logits``), targets (B, C)."""
        s, t = _check_matrices(scores, targets)
        if s.shape[1] != self.num_classes:
            raise ValueError(f"batch has {s.shape[1]} classes, the evaluator {self.num_classes}")
        self._scores.append(s)
        self._targets.append(t)

    def compute(self) -> dict[str, Any]:
        """All metrics over every batch seen (on every rank under torch.distributed)."""
        s = np.concatenate(self._scores) if self._scores else np.zeros((0, self.num_classes))
        t = np.concatenate(self._targets) if self._targets else np.zeros((0, self.num_classes), dtype=np.int8)
        s, t = _all_gather_rows(s, t)
        return evaluate(s, t, self.classnames, self.group_counts, **self.options)


def _all_gather_rows(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate (n_r, C) scores/targets of every rank in rank order; unchanged without distributed."""
    if not is_distributed():
        return scores, targets
    device = collective_device()
    C = scores.shape[1]
    rows = torch.from_numpy(np.concatenate([scores, targets.astype(np.float64)], axis=1)).to(device)  # (n, 2C)
    full = all_gather_cat(rows).cpu().numpy()
    return full[:, :C], full[:, C:].astype(np.int8)


# ---------------------------------------------------------------------------------------- output
def format_table(result: dict[str, Any]) -> str:
    """A plain-text table: total / head / medium / tail mAP and variance, with class counts per group."""

    def cell(v: float | None) -> str:
        return f"{v:8.2f}" if v is not None else f"{'-':>8}"

    sizes = result.get("group_sizes", {})
    n_eval = result["num_classes"] - len(result["no_positive_classes"])
    has_groups = bool(result.get("groups"))
    lines = [
        f"AP variant: {result['ap_variant']}   images: {result['num_images']}",
        f"{'':8}" + "".join(f"{h:>8}" for h in ("total", "head", "medium", "tail", "var")),
        f"{'mAP':8}" + "".join(cell(result[k]) for k in ("map", *GROUPS, "var")),
        f"{'classes':8}{n_eval:8d}" + "".join(f"{sizes.get(g, 0) if has_groups else '-':>8}" for g in GROUPS),
    ]
    if result["no_positive_classes"]:
        lines.append(f"no positive test image (excluded): {', '.join(result['no_positive_classes'])}")
    return "\n".join(lines)


def _load_matrix(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix in (".csv", ".txt"):
        delimiter = "," if "," in path.read_text(encoding="utf-8") else None
        return np.loadtxt(path, delimiter=delimiter, dtype=np.float64, ndmin=2, comments="#")
    raise ScoreFileError(f"{path}: unsupported score file type {suffix!r}; use .npy, .csv or .txt")


def read_scores(path: str | os.PathLike, num_images: int, num_classes: int) -> np.ndarray:
    """Load an (N, C) score matrix whose rows follow the label list's image order.

    Args:
        path: a ``.npy`` array, or a ``.csv`` / ``.txt`` matrix (comma or whitespace separated).
        num_images: N, the number of images of the label list.
        num_classes: C.

    Raises:
        ScoreFileError: missing or unreadable file, wrong shape, NaN or inf entries.
    """
    path = Path(path)
    if not path.is_file():
        raise ScoreFileError(f"{path}: score file not found")
    try:
        arr = np.asarray(_load_matrix(path), dtype=np.float64)
    except ScoreFileError:
        raise
    except (OSError, ValueError, TypeError, UnicodeDecodeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ScoreFileError(f"{path}: cannot read scores ({reason})") from None
    if arr.ndim == 1 and num_classes == 1:
        arr = arr[:, None]
    if arr.shape != (num_images, num_classes):
        raise ScoreFileError(
            f"{path}: expected shape ({num_images}, {num_classes}) (one row per image, in label-list order), "
            f"got {arr.shape}"
        )
    bad = ~np.isfinite(arr)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ScoreFileError(f"{path}: {int(bad.sum())} NaN or inf entries (first at row {r}, column {c})")
    return arr
