"""Stratified multi-label train / val / test splits of a user's own images (``cimlic import``).

The split is iterative stratification (Sechidis, Tsoumakas and Vlahavas, ECML PKDD 2011) as implemented by the
``iterative-stratification`` package (``iterstrat``), followed by a small repair pass of our own.

What iterstrat guarantees, and what it does not:

- It aims at per-class proportions: every class's images are shared out as close to the fractions as it can,
  rarest class first, each image to the part that still "wants" the most of that class.
- Part *sizes* are not guaranteed: the wanted number of images per part (``fraction * N``, here rounded by
  largest remainder and passed as an exact count) only breaks ties, so sizes come out close but not exact;
  measured on long-tailed matrices of 50 to 2,000 images: within 0 to 2 images mostly, at worst about 1 % of N
  (dense labels, few label-free images). Images with no positive label are dealt last, each to the part that
  still wants the most images, which evens sizes out.
- A rare class can end up entirely in one part: with fractions 0.7 / 0.1 / 0.2, the two images of a class both
  go to train (each image goes to the part that still wants the most of the class, and train wants 1.4).

The repair pass (our design) then moves single images between parts, deterministically:

- no part is left empty;
- it tries to put a class with at least as many images as there are parts in every part, and a class with fewer
  images (k < P) in k parts, chosen in the order train, test, then the parts between (a class needs training
  images first, test images second);
- an image is moved from the part holding the most images of the class, and only if its removal leaves no class
  absent from that part that was present there (among such images, the one with the fewest positive labels).

The last rule means the aim is not always reached: when every image of a class that could move also carries
another class whose only image in that part it is, nothing moves and the class stays absent from a part (labels
that always co-occur, or dense labels on few images). ``cimlic import`` warns about such classes and lists them
in ``stats.json`` (``absent_classes``). Each move changes two part sizes by one, so sizes stay near the
fractions (within a few images on the matrices measured above; a heavily repaired split can drift further).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from cimlic.errors import CimlicError

logger = logging.getLogger(__name__)


class SplitError(CimlicError, ValueError):
    """A split cannot be made (bad fractions, fewer images than parts)."""


def check_fractions(fractions: Sequence[float]) -> list[float]:
    """The fractions as floats: 1 to 3 positive values summing to 1 (within 1e-6); SplitError otherwise."""
    try:
        fr = [float(f) for f in fractions]
    except (TypeError, ValueError):
        raise SplitError(f"split fractions must be numbers, got {list(fractions)!r}") from None
    if not 1 <= len(fr) <= 3:
        raise SplitError(f"give 1, 2 or 3 split fractions (train[, val], test), got {len(fr)}")
    if any(not np.isfinite(f) or f <= 0 for f in fr):
        raise SplitError(f"split fractions must be positive, got {fr}")
    if abs(sum(fr) - 1.0) > 1e-6:
        raise SplitError(f"split fractions must sum to 1, got {fr} (sum {sum(fr):g})")
    return fr


def part_sizes(n: int, fractions: Sequence[float]) -> list[int]:
    """Target size of each part: ``fraction * n`` rounded by largest remainder, every part at least one image."""
    raw = np.asarray(fractions, dtype=np.float64) * n
    sizes = np.floor(raw).astype(np.int64)
    for k in np.argsort(-(raw - sizes), kind="stable")[: n - int(sizes.sum())]:
        sizes[k] += 1
    while (sizes == 0).any():  # tiny n: take one image from the largest part
        sizes[int(np.argmax(sizes))] -= 1
        sizes[int(np.flatnonzero(sizes == 0)[0])] += 1
    return sizes.tolist()


def stratified_split(targets: np.ndarray, fractions: Sequence[float], seed: int = 0) -> list[np.ndarray]:
    """Split images into parts of the given fractions, keeping every class's share close to them.

    Args:
        targets: (N, C) labels in {1, 0, -1}; -1 (unknown) counts as 0.
        fractions: 1, 2 or 3 positive fractions summing to 1, e.g. (train, val, test).
        seed: seed of iterstrat's tie-breaking and shuffling; the same seed gives the same split.

    Returns:
        One sorted int64 index array per fraction; together a partition of ``range(N)``.

    Raises:
        SplitError: bad fractions, or fewer images than parts.
    """
    fr = check_fractions(fractions)
    Y = np.asarray(targets) == 1  # (N, C) bool
    if Y.ndim != 2:
        raise SplitError(f"targets must be 2-D (N, C), got shape {Y.shape}")
    n, P = Y.shape[0], len(fr)
    if P == 1:
        return [np.arange(n, dtype=np.int64)]
    if n < P:
        raise SplitError(f"{n} image(s) cannot fill {P} split parts")
    sizes = part_sizes(n, fr)
    rng = np.random.RandomState(seed)
    assign = np.zeros(n, dtype=np.int64)  # part of each image; what is never carved off is part 0
    remaining = np.arange(n)
    for k in range(P - 1, 0, -1):  # carve the last part off everything, then the next from the rest
        rest, part = _carve(Y[remaining], sizes[k], rng)
        assign[remaining[part]] = k
        remaining = remaining[rest]
    moves = _repair(Y, assign, P)
    if moves:
        logger.debug("split repair moved %d image(s) between parts", moves)
    return [np.flatnonzero(assign == k).astype(np.int64) for k in range(P)]


def _carve(Y: np.ndarray, n_part: int, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """(rest, part) row indices of Y: a stratified part of ``n_part`` target images (iterstrat)."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    if Y.shape[1] < 2:  # iterstrat needs a multi-label indicator matrix; an all-zero column changes nothing
        Y = np.concatenate([Y, np.zeros((Y.shape[0], 2 - Y.shape[1]), dtype=bool)], axis=1)
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=n_part, random_state=rng)
    rest, part = next(splitter.split(np.zeros((Y.shape[0], 1)), Y))
    return rest, part


def _priority(P: int) -> list[int]:
    """Order in which parts receive a rare class: train, test, then the parts between."""
    return [0, P - 1, *range(1, P - 1)] if P > 1 else [0]


def _pick(Y: np.ndarray, rows: np.ndarray, src_counts: np.ndarray, keep: np.ndarray) -> int | None:
    """Row to move out of a part: its removal leaves every ``keep`` class present there; fewest positives first."""
    pos = Y[rows]  # (m, C)
    breaks = (pos & keep & (src_counts < 2)).sum(axis=1)
    ok = np.flatnonzero(breaks == 0)
    if ok.size == 0:
        return None
    best = ok[np.lexsort((rows[ok], pos[ok].sum(axis=1)))[0]]
    return int(rows[best])


def _move(Y: np.ndarray, assign: np.ndarray, counts: np.ndarray, sizes: np.ndarray, i: int, dst: int) -> None:
    src = assign[i]
    counts[src] -= Y[i]
    counts[dst] += Y[i]
    sizes[src] -= 1
    sizes[dst] += 1
    assign[i] = dst


def _repair(Y: np.ndarray, assign: np.ndarray, P: int) -> int:
    """Fill empty parts, then put each class in min(count, P) parts (see the module docstring); returns the moves."""
    counts = np.stack([Y[assign == k].sum(axis=0) for k in range(P)]).astype(np.int64)  # (P, C)
    sizes = np.bincount(assign, minlength=P)
    moves = 0
    for dst in np.flatnonzero(sizes == 0):
        src = int(np.argmax(sizes))
        rows = np.flatnonzero(assign == src)
        i = _pick(Y, rows, counts[src], counts[src] > 0)
        if i is None:  # every image carries a class unique in the part: take the one with the fewest labels
            i = int(rows[np.lexsort((rows, Y[rows].sum(axis=1)))[0]])
        _move(Y, assign, counts, sizes, i, int(dst))
        moves += 1
    total = counts.sum(axis=0)
    order = _priority(P)
    changed = True
    while changed:  # every move removes a wanted (class, part) absence and adds none: this ends
        changed = False
        for c in np.argsort(total, kind="stable"):  # rarest class first
            wanted = order[: min(int(total[c]), P)]
            for dst in [p for p in wanted if counts[p, c] == 0]:
                i = _take_from(Y, assign, counts, sizes, int(c), dst, wanted)
                if i is not None:
                    _move(Y, assign, counts, sizes, i, dst)
                    moves += 1
                    changed = True
    return moves


def _take_from(
    Y: np.ndarray, assign: np.ndarray, counts: np.ndarray, sizes: np.ndarray, c: int, dst: int, wanted: list[int]
) -> int | None:
    """An image of class ``c`` to move to part ``dst``, from the part with the most of ``c`` that can give one."""
    sources = [
        q
        for q in range(len(counts))
        if q != dst and sizes[q] >= 2 and (counts[q, c] >= 2 or (counts[q, c] >= 1 and q not in wanted))
    ]
    for src in sorted(sources, key=lambda q: (-counts[q, c], q)):
        rows = np.flatnonzero((assign == src) & Y[:, c])
        keep = counts[src] > 0
        if src not in wanted:
            keep[c] = False  # the class may leave a part it is not wanted in
        i = _pick(Y, rows, counts[src], keep)
        if i is not None:
            return i
    return None


def split_counts(
    targets: np.ndarray, parts: Sequence[np.ndarray], classnames: Sequence[str], part_names: Sequence[str]
) -> dict[str, dict[str, int]]:
    """Per class, its number of positive images in each part and in total: ``{class: {part: n, "total": n}}``."""
    if len(parts) != len(part_names):
        raise ValueError(f"{len(parts)} parts but {len(part_names)} part names")
    Y = np.asarray(targets) == 1
    per_part = [Y[np.asarray(p, dtype=np.int64)].sum(axis=0) for p in parts]
    out: dict[str, dict[str, int]] = {}
    for c, name in enumerate(classnames):
        row = {pn: int(pc[c]) for pn, pc in zip(part_names, per_part, strict=True)}
        row["total"] = int(sum(row.values()))
        out[name] = row
    return out
