"""Readers of real annotation formats into a LabelSet: VOCdevkit trees, COCO instances JSON, CSV.

Label conventions follow METHODS §1.1. Every malformed input raises ``LabelFileError`` naming the file.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from cimlic.data.labels import LabelFileError, LabelSet
from cimlic.errors import ConfigError
from cimlic.io import read_json, read_text

logger = logging.getLogger(__name__)

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
Difficult = Literal["positive", "negative", "ignore"]


# ------------------------------------------------------------------------------------------- VOC
def find_voc_year_dir(path: str | os.PathLike, year: str) -> Path:
    """Accept ``VOCdevkit/VOC2012`` itself or its parent ``VOCdevkit`` (or a folder holding VOCdevkit)."""
    path = Path(path)
    for cand in (path, path / f"VOC{year}", path / "VOCdevkit" / f"VOC{year}"):
        if (cand / "Annotations").is_dir():
            return cand
    raise LabelFileError(
        f"{path}: not a VOC{year} folder (no Annotations/ in it, in VOC{year}/ or VOCdevkit/VOC{year}/)"
    )


def parse_voc_xml(path: Path) -> list[tuple[str, bool]]:
    """(class name, difficult) of every ``<object>`` in one VOC annotation file."""
    if not path.is_file():
        raise LabelFileError(f"{path}: annotation file not found")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise LabelFileError(f"{path}: malformed XML ({err})") from None
    objects = []
    for obj in root.iter("object"):
        name = obj.findtext("name")
        if name is None or not name.strip():
            raise LabelFileError(f"{path}: an <object> has no <name>")
        diff = (obj.findtext("difficult") or "0").strip()
        objects.append((name.strip(), diff == "1"))
    return objects


def read_voc(
    voc_dir: str | os.PathLike,
    image_set: str,
    year: str,
    classnames: Sequence[str] = VOC_CLASSES,
    difficult: Difficult = "positive",
) -> LabelSet:
    """Labels of a VOC image set (``ImageSets/Main/<image_set>.txt`` order) from the XML annotations.

    Args:
        voc_dir: ``VOCdevkit/VOC<year>`` or a folder containing it.
        image_set: 'trainval', 'train', 'val' or 'test'.
        year: '2007' or '2012'.
        classnames: class list (alphabetical VOC order by default).
        difficult: how ``difficult`` objects count: positive (default, METHODS §1.1), negative, or
            ignore (class unknown, −1, when all its objects in the image are difficult).
    """
    if difficult not in ("positive", "negative", "ignore"):
        raise ConfigError(f"difficult must be positive, negative or ignore, got {difficult!r}")
    root = find_voc_year_dir(voc_dir, year)
    set_file = root / "ImageSets" / "Main" / f"{image_set}.txt"
    if not set_file.is_file():
        raise LabelFileError(f"{set_file}: image-set file not found")
    ids = [ln.split()[0] for ln in read_text(set_file, LabelFileError, "image-set file").splitlines() if ln.strip()]
    if not ids:
        raise LabelFileError(f"{set_file}: lists no image")
    index = {n: i for i, n in enumerate(classnames)}
    targets = np.zeros((len(ids), len(classnames)), dtype=np.int8)
    for row, image_id in enumerate(tqdm(ids, desc=f"VOC{year} {image_set}", unit="xml", leave=False)):
        xml = root / "Annotations" / f"{image_id}.xml"
        easy, hard = set(), set()
        for name, is_difficult in parse_voc_xml(xml):
            if name not in index:
                raise LabelFileError(f"{xml}: unknown class name {name!r}; valid: {list(classnames)}")
            (hard if is_difficult else easy).add(index[name])
        targets[row, list(easy)] = 1
        only_hard = list(hard - easy)
        if difficult == "positive":
            targets[row, only_hard] = 1
        elif difficult == "ignore":
            targets[row, only_hard] = -1
    return LabelSet(ids, targets, list(classnames), source=str(set_file))


# ------------------------------------------------------------------------------------------ COCO
def _load_json(path: Path) -> dict:
    data = read_json(path, LabelFileError, "annotation file")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise LabelFileError(f"{path}: not a COCO instances file (no {key!r} list)")
    return data


def _why(err: Exception) -> str:
    """A short reason for a malformed JSON entry: the missing key, or the error's own words."""
    if isinstance(err, KeyError):
        return f"missing key {err.args[0]!r}"
    return f"{type(err).__name__}: {err}"


def read_coco(
    ann_file: str | os.PathLike, classnames: Sequence[str] | None = None, min_side: int = 0
) -> tuple[LabelSet, dict[str, str]]:
    """Labels from a COCO instances JSON (METHODS §1.1), images in ascending image-id order.

    A category is positive when any of its annotations has area > 0, w >= 1 and h >= 1 (crowd included).
    Category ids map to 0..C−1 in ascending id order; ``classnames`` (if given) must have C names.

    Args:
        ann_file: ``instances_<split>.json``.
        classnames: names to use for the categories (default: the file's own names).
        min_side: drop images whose shorter side is below this (32 for the COCO-LT pool).

    Returns:
        The label set (ids = file-name stems, e.g. ``000000554625``) and a map id → file name.
    """
    path = Path(ann_file)
    data = _load_json(path)
    try:
        cats = sorted(data["categories"], key=lambda c: int(c["id"]))
        cat_index = {int(c["id"]): k for k, c in enumerate(cats)}
        names = [str(c["name"]) for c in cats]
        images = sorted(data["images"], key=lambda im: int(im["id"]))
    except (KeyError, TypeError, ValueError) as err:
        raise LabelFileError(f"{path}: malformed category or image entry ({_why(err)})") from None
    if classnames is not None:
        if len(classnames) != len(names):
            raise LabelFileError(f"{path}: {len(names)} categories but the class list has {len(classnames)} names")
        names = list(classnames)
    if not names:
        raise LabelFileError(f"{path}: no category")
    all_ids = {int(im["id"]) for im in images}
    images = [im for im in images if _shorter_side(im, path) >= min_side]
    row_of = {int(im["id"]): r for r, im in enumerate(images)}
    targets = np.zeros((len(images), len(names)), dtype=np.int8)
    for ann in data["annotations"]:  # _load_json checked it is a list
        ann_id = ann.get("id", "?") if isinstance(ann, dict) else "?"
        try:
            img, cat = int(ann["image_id"]), int(ann["category_id"])
            _, _, w, h = (float(v) for v in ann["bbox"])
            area = float(ann.get("area", w * h))
        except (KeyError, TypeError, ValueError) as err:
            raise LabelFileError(f"{path}: malformed annotation {ann_id} ({_why(err)})") from None
        if cat not in cat_index:
            raise LabelFileError(f"{path}: annotation {ann_id} has unknown category id {cat}")
        if img not in all_ids:
            raise LabelFileError(f"{path}: annotation {ann_id} is for image id {img}, not in 'images'")
        if img in row_of and area > 0 and w >= 1 and h >= 1:
            targets[row_of[img], cat_index[cat]] = 1
    ids = [Path(str(im.get("file_name", f"{int(im['id']):012d}.jpg"))).stem for im in images]
    files = {i: str(im.get("file_name", f"{i}.jpg")) for i, im in zip(ids, images, strict=True)}
    return LabelSet(ids, targets, names, source=str(path)), files


def _shorter_side(image: dict, path: Path) -> float:
    """min(width, height) of a COCO image entry; LabelFileError naming the image id when they are not numbers."""
    try:
        return min(float(image.get("width", 0)), float(image.get("height", 0)))
    except (TypeError, ValueError):
        raise LabelFileError(
            f"{path}: image {image.get('id', '?')} has a non-numeric width or height "
            f"({image.get('width')!r} x {image.get('height')!r})"
        ) from None


# ------------------------------------------------------------------------------------------- CSV
def read_csv_labels(path: str | os.PathLike, classnames: Sequence[str], sep: str = ";") -> LabelSet:
    """Labels from a CSV of ``path,label;label`` rows (class names; an optional header row ``path,labels``)."""
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"{path}: CSV file not found")
    index = {n: i for i, n in enumerate(classnames)}
    ids, rows = [], []
    text = read_text(path, LabelFileError, "CSV file")
    for lineno, rec in enumerate(csv.reader(io.StringIO(text, newline="")), 1):
        if not rec or not "".join(rec).strip() or rec[0].lstrip().startswith("#"):
            continue
        if lineno == 1 and rec[0].strip().lower() in ("path", "image", "image_id", "file"):
            continue
        if len(rec) > 2:
            raise LabelFileError(f"{path}:{lineno}: expected 'path,label{sep}label', got {len(rec)} fields")
        row = np.zeros(len(classnames), dtype=np.int8)
        for name in filter(None, (s.strip() for s in (rec[1] if len(rec) > 1 else "").split(sep))):
            if name not in index:
                raise LabelFileError(f"{path}:{lineno}: unknown class name {name!r}; valid: {list(classnames)}")
            row[index[name]] = 1
        ids.append(rec[0].strip())
        rows.append(row)
    if not ids:
        raise LabelFileError(f"{path}: no image in CSV")
    return LabelSet(ids, np.stack(rows), list(classnames), source=str(path))
