"""LabelSet: image ids, a multi-hot target matrix with -1 for unknown entries, and class names.

The plain label-list format (the one of ``shared/data`` and of every file ``cimlic`` writes)::

    # comment lines start with '#'
    image_id<TAB>positive class indices separated by spaces[<TAB>unknown class indices]

An empty second column means "no positive label". The optional third column lists the entries whose
label is unknown (partial labels, METHODS §1.4); without it every entry is known.
The common ``path idx idx ...`` format (whitespace only, no TAB) is read too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cimlic.errors import CimlicError
from cimlic.io import atomic_write_text, read_text

logger = logging.getLogger(__name__)

GROUPS = ("head", "medium", "tail")


class LabelFileError(CimlicError, ValueError):
    """A label, class or annotation file is missing or malformed (the message names the file)."""


@dataclass
class LabelSet:
    """Multi-label targets of a set of images.

    Attributes:
        ids: image ids (or relative paths), one per row.
        targets: (N, C) int8 matrix in {1, 0, -1}; -1 = unknown.
        classnames: the C class names, index = column.
        source: where the labels came from (for error messages).
    """

    ids: list[str]
    targets: np.ndarray
    classnames: list[str]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        self.targets = np.asarray(self.targets, dtype=np.int8)
        if self.targets.ndim != 2:
            raise LabelFileError(f"{self.source}: targets must be 2-D (N, C), got shape {self.targets.shape}")
        n, c = self.targets.shape
        if n != len(self.ids):
            raise LabelFileError(f"{self.source}: {len(self.ids)} ids but {n} target rows")
        if c != len(self.classnames):
            raise LabelFileError(f"{self.source}: {len(self.classnames)} class names but {c} target columns")
        bad = ~np.isin(self.targets, (-1, 0, 1))
        if bad.any():
            raise LabelFileError(f"{self.source}: targets must be in {{1, 0, -1}}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def class_counts(self) -> np.ndarray:
        """(C,) number of images with a known positive label of each class (n_c)."""
        return (self.targets == 1).sum(axis=0).astype(np.int64)

    def groups(self, head: int = 100, tail: int = 20) -> np.ndarray:
        """(C,) 'head' / 'medium' / 'tail' from this set's class counts (METHODS §1.2 step 5)."""
        return class_groups(self.class_counts(), head=head, tail=tail)

    def subset(self, indices: Sequence[int]) -> LabelSet:
        """The rows ``indices`` (in that order) as a new LabelSet."""
        idx = np.asarray(indices, dtype=np.int64)
        return LabelSet([self.ids[i] for i in idx], self.targets[idx], list(self.classnames), self.source)

    def known_fraction(self) -> float:
        """Fraction of (image, class) entries whose label is known."""
        return float((self.targets != -1).mean()) if self.targets.size else 1.0

    def positives(self, row: int) -> list[int]:
        return np.flatnonzero(self.targets[row] == 1).tolist()


def class_groups(counts: np.ndarray | Sequence[int], head: int = 100, tail: int = 20) -> np.ndarray:
    """Group of each class from its training count: head n >= ``head``, tail n < ``tail``, else medium.

    Args:
        counts: (C,) training image counts n_c.
        head: smallest count of a head class (100 in the LT benchmarks).
        tail: counts below this are tail classes (20 in the LT benchmarks).

    Returns:
        (C,) array of strings in ``GROUPS``.
    """
    counts = np.asarray(counts)
    out = np.full(counts.shape, "medium", dtype=object)
    out[counts >= head] = "head"
    out[counts < tail] = "tail"
    return out.astype(str)


def read_classes(path: str | os.PathLike) -> list[str]:
    """Class names, one per line (blank lines and '#' comments skipped); index = position."""
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"{path}: class file not found")
    names = [ln.strip() for ln in read_text(path, LabelFileError, "class file").splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise LabelFileError(f"{path}: class file lists no class")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise LabelFileError(f"{path}: duplicate class names {dup}")
    return names


def _parse_indices(text: str, num_classes: int, path: Path, lineno: int) -> list[int]:
    out = []
    for tok in text.split():
        try:
            k = int(tok)
        except ValueError:
            raise LabelFileError(f"{path}:{lineno}: class index {tok!r} is not an integer") from None
        if not 0 <= k < num_classes:
            raise LabelFileError(f"{path}:{lineno}: class index {k} out of range 0..{num_classes - 1}")
        out.append(k)
    return out


def read_label_list(path: str | os.PathLike, classnames: Sequence[str], allow_empty: bool = False) -> LabelSet:
    """Read a plain label list (TAB format, or the whitespace ``path idx idx ...`` format).

    Args:
        path: the list file.
        classnames: class names; indices in the file refer to them.
        allow_empty: accept a file with no image line.

    Raises:
        LabelFileError: missing file, bad index, duplicate id, or no image (unless ``allow_empty``).
    """
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"{path}: label list not found")
    C = len(classnames)
    ids: list[str] = []
    rows: list[np.ndarray] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(read_text(path, LabelFileError, "label list").split("\n"), 1):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "\t" in line:
            cols = line.split("\t")
            if len(cols) > 3:
                raise LabelFileError(f"{path}:{lineno}: expected at most 3 TAB-separated columns, got {len(cols)}")
            image_id = cols[0].strip()
            pos = _parse_indices(cols[1], C, path, lineno) if len(cols) > 1 else []
            unk = _parse_indices(cols[2], C, path, lineno) if len(cols) > 2 else []
        else:
            toks = line.split()
            image_id, pos, unk = toks[0], _parse_indices(" ".join(toks[1:]), C, path, lineno), []
        if not image_id:
            raise LabelFileError(f"{path}:{lineno}: empty image id")
        if image_id in seen:
            raise LabelFileError(f"{path}:{lineno}: image id {image_id!r} repeats line {seen[image_id]}")
        if set(pos) & set(unk):
            raise LabelFileError(f"{path}:{lineno}: a class is both positive and unknown")
        seen[image_id] = lineno
        row = np.zeros(C, dtype=np.int8)
        row[pos] = 1
        row[unk] = -1
        ids.append(image_id)
        rows.append(row)
    if not ids and not allow_empty:
        raise LabelFileError(f"{path}: no image in label list")
    targets = np.stack(rows) if rows else np.zeros((0, C), dtype=np.int8)
    return LabelSet(ids, targets, list(classnames), source=str(path))


def format_label_line(image_id: str, row: np.ndarray) -> str:
    """One line of the plain format for a target row in {1, 0, -1}."""
    pos = " ".join(str(k) for k in np.flatnonzero(row == 1))
    unk = np.flatnonzero(row == -1)
    line = f"{image_id}\t{pos}"
    if unk.size:
        line += "\t" + " ".join(str(k) for k in unk)
    return line


def write_label_list(path: str | os.PathLike, labels: LabelSet, header: str | None = None) -> None:
    """Write ``labels`` in the plain TAB format (atomically)."""
    head = header or "image_id<TAB>positive class indices<TAB>unknown class indices (optional); see classes file"
    lines = [f"# {head}"] + [format_label_line(i, r) for i, r in zip(labels.ids, labels.targets, strict=True)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_classes(path: str | os.PathLike, classnames: Sequence[str]) -> None:
    atomic_write_text(path, "\n".join(classnames) + "\n")


def read_id_list(path: str | os.PathLike) -> list[str]:
    """Image ids, one per line (first whitespace token; '#' comments skipped)."""
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"{path}: id list not found")
    ids = []
    for ln in read_text(path, LabelFileError, "id list").splitlines():
        if ln.strip() and not ln.lstrip().startswith("#"):
            ids.append(ln.split()[0])
    if not ids:
        raise LabelFileError(f"{path}: id list is empty")
    return ids
