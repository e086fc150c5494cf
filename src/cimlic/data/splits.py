"""Benchmark split builders: long-tailed subsets (METHODS §1.2), few-shot episodes (§1.3), partial labels (§1.4).

The long-tailed builder follows the published protocol literally (Python ``random`` seeded once, CPython
``set`` iteration order), so that it regenerates the published VOC-LT list id for id, order included.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import numpy as np

from cimlic.data.labels import LabelSet
from cimlic.errors import CimlicError

logger = logging.getLogger(__name__)

# Few-shot novel classes (METHODS §1.3): LaSO partition for MS-COCO, 14/6 for VOC2007.
FEWSHOT_NOVEL = {
    "voc": ["cat", "dog", "pottedplant", "sheep", "sofa", "tvmonitor"],
    "coco": [
        "bicycle", "boat", "stop sign", "bird", "backpack", "frisbee", "snowboard", "surfboard",
        "cup", "fork", "spoon", "broccoli", "chair", "keyboard", "microwave", "vase",
    ],
}  # fmt: skip


class SplitError(CimlicError, ValueError):
    """A split cannot be built from the given labels and settings."""


# ------------------------------------------------------------------------------------ long tail
def pareto_targets(num_classes: int, n_max: int, n_min: int = 1, shape: float = 6.0) -> list[int]:
    """Per-rank target image counts: Pareto pdf sampled at ``num_classes`` points (METHODS §1.2 step 2).

    x_k = linspace(ppf(0), ppf(0.99)) = linspace(1, 0.01^(-1/b)); target_k = int(pdf(x_k)·(n_max−n_min)/b + n_min)
    with pdf(x) = b·x^(−(b+1)). For VOC (C=20, n_max=800): 800, 529, 359, ..., 4.
    """
    if num_classes < 1:
        raise SplitError("need at least one class")
    x = np.linspace(1.0, 0.01 ** (-1.0 / shape), num_classes)
    pdf = shape * x ** (-(shape + 1.0))
    return [int(p * (n_max - n_min) / shape + n_min) for p in pdf]


def visit_order(targets: np.ndarray) -> list[int]:
    """Class visiting order: descending column sums of P(j | i) = #(i ∧ j) / #i (METHODS §1.2 step 3)."""
    G = (np.asarray(targets) == 1).astype(np.float64)  # (N, C)
    co = G.T @ G  # (C, C) co-occurrence counts
    count = np.diag(co).copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        cond = np.where(count[:, None] > 0, co / count[:, None], 0.0)  # row i: P(j | i)
    score = cond.sum(axis=0)
    return [int(c) for c in np.argsort(-score)]


def build_longtail(
    pool: LabelSet,
    n_max: int,
    n_min: int = 1,
    shape: float = 6.0,
    seed: int = 0,
    clamp: bool = False,
) -> list[int]:
    """Greedy long-tailed subset of ``pool`` (METHODS §1.2 steps 2–4).

    Args:
        pool: the source pool in its file order (VOC2012 trainval, or COCO train2017 in id order).
        n_max: target count of the most frequent class (800 VOC, 1200 COCO).
        n_min: smallest target count.
        shape: Pareto shape b.
        seed: seed of Python's ``random``, set once before the loop.
        clamp: clamp each addition to the available candidates (COCO); without it (VOC) a shortfall is an error.

    Returns:
        Pool row indices of the chosen images, in the order of the protocol's output (``list(set)``).

    Raises:
        SplitError: empty pool, a class with no image, or (without ``clamp``) a target larger than the pool allows.
    """
    if len(pool) == 0:
        raise SplitError(f"{pool.source}: the pool has no image")
    if not shape > 0 or n_min < 1 or n_max < n_min:
        raise SplitError(f"long-tail split needs shape > 0 and 1 <= n_min <= n_max (got shape {shape}, "
                         f"n_min {n_min}, n_max {n_max})")  # fmt: skip
    pos = pool.targets == 1
    C = pool.num_classes
    empty = [pool.classnames[c] for c in range(C) if not pos[:, c].any()]
    if empty:
        raise SplitError(f"{pool.source}: no image of class(es) {empty} in the pool")
    labels_of = [np.flatnonzero(row).tolist() for row in pos]  # per image: its classes
    members = [np.flatnonzero(pos[:, c]).tolist() for c in range(C)]  # per class: ascending pool indices
    targets = pareto_targets(C, n_max, n_min, shape)
    order = visit_order(pool.targets)

    random.seed(seed)
    chosen: set[int] = set()
    owned: list[set[int]] = [set() for _ in range(C)]
    count = [0] * C
    for k, c in enumerate(order):
        delta = targets[k] - count[c]
        if delta < 0:
            for i in random.sample(list(owned[c]), -delta):
                chosen.discard(i)
                for lab in labels_of[i]:
                    owned[lab].discard(i)
                    count[lab] -= 1
        elif delta > 0:
            candidates = set(members[c]) - owned[c]
            if delta > len(candidates):
                if not clamp:
                    raise SplitError(
                        f"{pool.source}: class {pool.classnames[c]!r} needs {delta} more images for target "
                        f"{targets[k]} but the pool has only {len(candidates)} left (lower --n-max or pass --clamp)"
                    )
                delta = len(candidates)
            for i in random.sample(list(candidates), delta):
                chosen.add(i)
                for lab in labels_of[i]:
                    owned[lab].add(i)
                    count[lab] += 1
    result = list(chosen)
    logger.info("long-tailed split: %d of %d images, n_c max %d min %d", len(result), len(pool), max(count), min(count))
    return result


# ------------------------------------------------------------------------------------- few-shot
def resolve_classes(names: Sequence[str], classnames: Sequence[str], source: str = "novel classes") -> list[int]:
    """Indices of ``names`` in ``classnames``; an unknown name is an error listing the valid ones."""
    index = {n: i for i, n in enumerate(classnames)}
    missing = [n for n in names if n not in index]
    if missing:
        raise SplitError(f"{source}: unknown class name(s) {missing}; valid: {list(classnames)}")
    return [index[n] for n in names]


def split_base_novel(labels: LabelSet, novel: Sequence[int]) -> tuple[list[int], list[int]]:
    """Rows whose positives are all base classes, and rows whose positives are all novel (METHODS §1.3).

    Images carrying both kinds of label, and images without any positive label, are dropped.
    Row order is kept.
    """
    is_novel = np.zeros(labels.num_classes, dtype=bool)
    is_novel[list(novel)] = True
    pos = labels.targets == 1
    has_novel = (pos & is_novel).any(axis=1)
    has_base = (pos & ~is_novel).any(axis=1)
    base = np.flatnonzero(has_base & ~has_novel).tolist()
    novel_rows = np.flatnonzero(has_novel & ~has_base).tolist()
    logger.info(
        "base/novel: %d base-only, %d novel-only, %d dropped",
        len(base),
        len(novel_rows),
        len(labels) - len(base) - len(novel_rows),
    )
    return base, novel_rows


def build_fewshot_episode(labels: LabelSet, novel: Sequence[int], shots: int, seed: int) -> list[int]:
    """A K-shot support set drawn from ``labels`` (the novel-only pool). **[our design]**

    Seeded greedy draw: visit the pool in a seeded random order and take an image when it carries a novel
    class still short of ``shots`` and none of its novel classes is already full, until every novel class
    has ``shots`` positives (so each class gets exactly K, as in the published VOC episodes). If that cannot
    finish, a second pass takes images that still help a short class even if another class goes past K.

    Returns:
        Chosen row indices, in draw order.
    """
    rng = random.Random(seed)
    pos = labels.targets[:, list(novel)] == 1  # (N, |novel|)
    short = [cls for cls, n in zip(novel, pos.sum(axis=0), strict=True) if n < shots]
    if short:
        names = [labels.classnames[c] for c in short]
        raise SplitError(f"{labels.source}: fewer than {shots} images of novel class(es) {names}")
    order = list(range(len(labels)))
    rng.shuffle(order)
    count = np.zeros(len(novel), dtype=np.int64)
    chosen: list[int] = []
    for strict in (True, False):
        for i in order:
            if (count >= shots).all():
                break
            row = pos[i]
            if i in chosen or not row.any() or not (row & (count < shots)).any():
                continue
            if strict and (row & (count >= shots)).any():
                continue
            chosen.append(i)
            count += row
    return chosen


# ------------------------------------------------------------------------------------- partial
def partial_labels(targets: np.ndarray, known: float, seed: int) -> np.ndarray:
    """Hide labels: each (image, class) entry stays known with probability ``known`` (METHODS §1.4).

    Entries already unknown stay unknown. Uses ``numpy.random.default_rng(seed)``.

    Returns:
        (N, C) int8 targets with −1 for hidden entries.
    """
    if not 0.0 < known <= 1.0:
        raise SplitError(f"known proportion must be in (0, 1], got {known}")
    targets = np.asarray(targets, dtype=np.int8)
    keep = np.random.default_rng(seed).random(targets.shape) < known  # (N, C)
    return np.where(keep, targets, np.int8(-1)).astype(np.int8)


def carve_validation(labels: LabelSet, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Hold out about ``fraction`` of the training images for model selection. **[our design]**

    Images are visited in a seeded random order and moved to validation while the validation set is
    smaller than ``fraction``·N and every positive class of the image keeps at most max(1, ⌊fraction·n_c⌋)
    validation images and at least one training image; so tail classes with a handful of images keep
    almost all of them for training.

    Returns:
        (training rows, validation rows), each in ascending order.
    """
    counts = labels.class_counts()
    cap = np.maximum(1, np.floor(fraction * counts)).astype(np.int64)
    taken = np.zeros_like(counts)
    target = round(fraction * len(labels))
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    val: list[int] = []
    for i in order:
        if len(val) >= target:
            break
        pos = labels.targets[i] == 1
        if (taken[pos] < cap[pos]).all() and (counts[pos] - taken[pos] > 1).all():
            val.append(i)
            taken[pos] += 1
    chosen = set(val)
    return [i for i in range(len(labels)) if i not in chosen], sorted(val)
