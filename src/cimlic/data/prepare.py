"""From dataset folders to the toolkit's label lists: ``cimlic prepare voc-lt | coco-lt | voc07 | coco2014`` for the
benchmarks, ``cimlic import`` (:func:`prepare_tagged`) for a practitioner's own tagged images.

Output folder: ``classes.txt``, ``train.txt``, ``test.txt`` (and ``val.txt`` for an import; plain label lists),
``stats.json`` and ``data.yaml`` (the ``data:`` section of a config pointing at the lists and image folders).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from cimlic.data.dataset import ImageFileError, load_image
from cimlic.data.formats import VOC_CLASSES, Difficult, find_voc_year_dir, read_coco, read_voc
from cimlic.data.imports import detect_format, read_tagged
from cimlic.data.labels import (
    LabelFileError,
    LabelSet,
    class_groups,
    read_classes,
    read_id_list,
    write_classes,
    write_label_list,
)
from cimlic.data.splits import build_longtail
from cimlic.data.stratify import SplitError, check_fractions, split_counts, stratified_split
from cimlic.errors import ConfigError
from cimlic.io import atomic_write_text, claim_output_folder, write_json

logger = logging.getLogger(__name__)

PART_NAMES = {1: ("train",), 2: ("train", "test"), 3: ("train", "val", "test")}  # cimlic import --split

# COCO-LT pool: train2017 images whose shorter side is >= 32 px (METHODS §1.2 step 1).
COCO_MIN_SIDE = 32


def split_stats(train: LabelSet, test: LabelSet, head: int = 100, tail: int = 20) -> dict:
    """Image counts, class counts, groups and group sizes of a train/test pair."""
    counts = train.class_counts()
    groups = train.groups(head, tail)
    return {
        "train_images": len(train),
        "test_images": len(test),
        "test_images_without_label": int(((test.targets == 1).sum(axis=1) == 0).sum()),
        "num_classes": train.num_classes,
        "class_counts": {n: int(c) for n, c in zip(train.classnames, counts, strict=True)},
        "max_count": int(counts.max()),
        "max_class": train.classnames[int(counts.argmax())],
        "min_count": int(counts.min()),
        "min_class": train.classnames[int(counts.argmin())],
        "groups": {g: int((groups == g).sum()) for g in ("head", "medium", "tail")},
        "group_thresholds": {"head": head, "tail": tail},
    }


def select_ids(pool: LabelSet, ids: Sequence[str], source: str) -> list[int]:
    """Rows of ``pool`` for the given ids (in that order); an id absent from the pool is an error."""
    row = {i: r for r, i in enumerate(pool.ids)}
    missing = [i for i in ids if i not in row]
    if missing:
        raise LabelFileError(f"{source}: {len(missing)} id(s) not in the pool {pool.source}, e.g. {missing[:3]}")
    return [row[i] for i in ids]


def check_images(root: Path, ids: Sequence[str], pattern: str) -> None:
    """Every image file exists; otherwise one error naming the first missing files."""
    missing = [str(root / pattern.format(id=i)) for i in ids if not (root / pattern.format(id=i)).is_file()]
    if missing:
        raise LabelFileError(f"{missing[0]}: image file not found ({len(missing)} missing in all)")


def _write_outputs(out: Path, train: LabelSet, test: LabelSet, data_cfg: dict, extra: dict) -> dict:
    stats = split_stats(train, test) | extra
    claim_output_folder(out, "cimlic prepare")
    write_classes(out / "classes.txt", train.classnames)
    write_label_list(out / "train.txt", train)
    write_label_list(out / "test.txt", test)
    write_json(out / "stats.json", stats)
    atomic_write_text(out / "data.yaml", yaml.safe_dump({"data": data_cfg}, sort_keys=False))
    logger.info("wrote %s: %d train / %d test images", out, len(train), len(test))
    return stats


def prepare_voc_lt(
    voc2012: str | os.PathLike,
    voc2007: str | os.PathLike,
    out: str | os.PathLike,
    split_file: str | os.PathLike | None = None,
    n_max: int = 800,
    seed: int = 0,
    difficult: Difficult = "positive",
    verify_images: bool = True,
) -> dict:
    """VOC-LT: train = long-tailed subset of VOC2012 trainval, test = VOC2007 test (METHODS §1.2).

    Args:
        voc2012: ``VOCdevkit/VOC2012`` (or a folder holding it).
        voc2007: ``VOCdevkit/VOC2007`` with the test annotations.
        out: output folder.
        split_file: published VOC-LT id list; when absent the split is regenerated.
        n_max, seed: long-tail builder settings (800, 0 reproduce the published list).
        difficult: how difficult objects count.
        verify_images: check every JPEG exists.

    Returns:
        The statistics written to ``stats.json``.
    """
    d12, d07 = find_voc_year_dir(voc2012, "2012"), find_voc_year_dir(voc2007, "2007")
    pool = read_voc(d12, "trainval", "2012", VOC_CLASSES, difficult)
    if split_file:
        rows = select_ids(pool, read_id_list(split_file), str(split_file))
    else:
        rows = build_longtail(pool, n_max=n_max, seed=seed, clamp=False)
    train = pool.subset(rows)
    test = read_voc(d07, "test", "2007", VOC_CLASSES, difficult)
    pattern = "JPEGImages/{id}.jpg"
    if verify_images:
        check_images(d12, train.ids, pattern)
        check_images(d07, test.ids, pattern)
    out = Path(out)
    data_cfg = {
        "name": "voc_lt", "classes": str(out / "classes.txt"), "train_labels": str(out / "train.txt"),
        "test_labels": str(out / "test.txt"), "train_image_root": str(d12.resolve()),
        "test_image_root": str(d07.resolve()), "image_pattern": pattern,
    }  # fmt: skip
    extra = {"split": str(split_file) if split_file else f"regenerated (n_max={n_max}, seed={seed})"}
    return _write_outputs(out, train, test, data_cfg, extra | {"difficult": difficult})


def prepare_coco_lt(
    coco: str | os.PathLike,
    out: str | os.PathLike,
    split_file: str | os.PathLike | None = None,
    classnames: Sequence[str] | None = None,
    n_max: int = 1200,
    seed: int = 0,
    verify_images: bool = True,
) -> dict:
    """COCO-LT: train = long-tailed subset of train2017 (clamped), test = val2017 (METHODS §1.2).

    Args:
        coco: folder with ``annotations/instances_{train,val}2017.json`` and ``train2017/``, ``val2017/``.
        out: output folder.
        split_file: published COCO-LT id list (integer ids or 12-digit stems); regenerated when absent.
        classnames: class names for categories in ascending id order (default: the JSON's names).
        n_max, seed: long-tail builder settings.
        verify_images: check every image file exists.
    """
    coco = Path(coco)
    ann = coco / "annotations"
    pool, _ = read_coco(ann / "instances_train2017.json", classnames, min_side=COCO_MIN_SIDE)
    if split_file:
        wanted = [f"{int(i):012d}" if i.isdigit() else i for i in read_id_list(split_file)]
        rows = select_ids(pool, wanted, str(split_file))
    else:
        rows = build_longtail(pool, n_max=n_max, seed=seed, clamp=True)
    train = pool.subset(rows)
    test, _ = read_coco(ann / "instances_val2017.json", pool.classnames)
    if verify_images:
        check_images(coco / "train2017", train.ids, "{id}.jpg")
        check_images(coco / "val2017", test.ids, "{id}.jpg")
    out = Path(out)
    data_cfg = {
        "name": "coco_lt", "classes": str(out / "classes.txt"), "train_labels": str(out / "train.txt"),
        "test_labels": str(out / "test.txt"), "train_image_root": str((coco / "train2017").resolve()),
        "test_image_root": str((coco / "val2017").resolve()), "image_pattern": "{id}.jpg",
    }  # fmt: skip
    extra = {"split": str(split_file) if split_file else f"regenerated (n_max={n_max}, seed={seed}, clamped)"}
    return _write_outputs(out, train, test, data_cfg, extra)


def group_table(stats: dict) -> str:
    """A short text summary of ``split_stats`` for the CLI."""
    g = stats["groups"]
    return (
        f"train {stats['train_images']} / test {stats['test_images']} images, {stats['num_classes']} classes; "
        f"n_c max {stats['max_count']} ({stats['max_class']}) min {stats['min_count']} ({stats['min_class']}); "
        f"head/medium/tail {g['head']}/{g['medium']}/{g['tail']}"
    )


def prepare_voc07(voc2007: str | os.PathLike, out: str | os.PathLike, difficult: Difficult = "positive",
                  verify_images: bool = True) -> dict:  # fmt: skip
    """Full VOC2007: train = trainval, test = test (few-shot and missing-label protocols)."""
    d07 = find_voc_year_dir(voc2007, "2007")
    train = read_voc(d07, "trainval", "2007", VOC_CLASSES, difficult)
    test = read_voc(d07, "test", "2007", VOC_CLASSES, difficult)
    if verify_images:
        check_images(d07, train.ids + test.ids, "JPEGImages/{id}.jpg")
    out = Path(out)
    data_cfg = {
        "name": "voc2007", "classes": str(out / "classes.txt"), "train_labels": str(out / "train.txt"),
        "test_labels": str(out / "test.txt"), "image_root": str(d07.resolve()), "image_pattern": "JPEGImages/{id}.jpg",
    }  # fmt: skip
    return _write_outputs(out, train, test, data_cfg, {"split": "VOC2007 trainval / test", "difficult": difficult})


def prepare_coco_full(coco: str | os.PathLike, out: str | os.PathLike, year: str = "2014",
                      classnames: Sequence[str] | None = None, verify_images: bool = True) -> dict:  # fmt: skip
    """Full COCO: train = train<year>, test = val<year> (few-shot: 2014, LaSO protocol; missing labels)."""
    coco = Path(coco)
    train, _ = read_coco(coco / "annotations" / f"instances_train{year}.json", classnames)
    test, _ = read_coco(coco / "annotations" / f"instances_val{year}.json", train.classnames)
    if verify_images:
        check_images(coco / f"train{year}", train.ids, "{id}.jpg")
        check_images(coco / f"val{year}", test.ids, "{id}.jpg")
    out = Path(out)
    data_cfg = {
        "name": f"coco{year}", "classes": str(out / "classes.txt"), "train_labels": str(out / "train.txt"),
        "test_labels": str(out / "test.txt"), "train_image_root": str((coco / f"train{year}").resolve()),
        "test_image_root": str((coco / f"val{year}").resolve()), "image_pattern": "{id}.jpg",
    }  # fmt: skip
    return _write_outputs(out, train, test, data_cfg, {"split": f"COCO train{year} / val{year}"})


# ------------------------------------------------------------------- your own tagged images (cimlic import)
def _check_one(path: Path) -> str | None:
    try:
        load_image(path).close()
    except ImageFileError as err:
        return str(err).removeprefix(f"{path}: ")
    except Exception as err:  # a hostile file can trip other decoder errors: still an unreadable image, not a bug
        return f"cannot decode image ({type(err).__name__}: {err})"
    return None


def unreadable_images(root: str | os.PathLike, ids: Sequence[str], progress: bool = True) -> list[tuple[str, str]]:
    """Decode every image ``root / id`` once; (id, reason) of each one that cannot be read, in ``ids`` order."""
    root = Path(root)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # decoding releases the GIL
        reasons = list(
            tqdm(
                pool.map(_check_one, [root / i for i in ids]),
                total=len(ids),
                desc="checking images",
                unit="img",
                disable=not progress,
            )
        )
    return [(i, r) for i, r in zip(ids, reasons, strict=True) if r is not None]


def prepare_tagged(
    source: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "auto",
    classes: str | os.PathLike | None = None,
    sep: str | None = None,
    split: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    strict: bool = False,
    head: int = 100,
    tail: int = 20,
) -> dict:
    """Import a user's tagged images: read labels, check images, split (stratified), write lists and ``data.yaml``.

    Args:
        source: the label file or folder (see :data:`FORMATS`).
        images: the folder the image paths are relative to.
        out: output folder (new, empty or an earlier cimlic output; a user's own files are never overwritten).
        fmt: the label format, or 'auto'.
        classes: optional class-list file (one name per line); fixes the class order.
        sep: tag separator of a tags CSV (None = auto).
        split: (train), (train, test) or (train, val, test) fractions summing to 1.
        seed: seed of the split.
        strict: an unreadable image is an error (default: it is left out and listed in ``bad_images.txt``).
        head, tail: group thresholds on the training counts.

    Returns:
        The statistics written to ``stats.json``.
    """
    try:
        fractions = check_fractions(split)
    except SplitError as err:
        raise ConfigError(f"--split: {err}") from None
    source, images, out = Path(source), Path(images), Path(out)
    if not images.is_dir():
        raise ImageFileError(f"{images}: image folder not found")
    fmt = detect_format(source) if fmt == "auto" else fmt
    labels = read_tagged(source, fmt, read_classes(classes) if classes else None, sep)
    never = [n for n, c in zip(labels.classnames, labels.class_counts(), strict=True) if c == 0]
    if never:
        where = f"drop them from {classes}" if classes else "no label row names them"
        raise LabelFileError(f"{source}: class(es) {never} have no image ({where})")
    claim_output_folder(out, "cimlic import")
    bad = unreadable_images(images, labels.ids)
    if bad and strict:
        raise ImageFileError(f"{images / bad[0][0]}: {bad[0][1]} ({len(bad)} unreadable image(s) in all)")
    bad_ids = {i for i, _ in bad}
    labels = labels.subset([r for r, i in enumerate(labels.ids) if i not in bad_ids])
    lost = [n for n, c in zip(labels.classnames, labels.class_counts(), strict=True) if c == 0]
    if lost:
        raise LabelFileError(
            f"{source}: class(es) {lost} appear only on images that cannot be read "
            f"({len(bad)} unreadable, e.g. {images / bad[0][0]}: {bad[0][1]}); fix those images"
            + (f" or drop the class(es) from {classes}" if classes else "")
        )
    names = PART_NAMES[len(fractions)]
    try:
        parts = stratified_split(labels.targets, fractions, seed)
    except SplitError as err:
        raise LabelFileError(f"{source}: {err}") from None
    if bad:
        logger.warning(
            "%d of %d images cannot be read and are left out (listed in %s): %s",
            len(bad),
            len(labels) + len(bad),
            out / "bad_images.txt",
            "; ".join(f"{i}: {r}" for i, r in bad[:3]),
        )
    stats = {"source": str(source), "format": fmt, "image_root": str(images.resolve())}
    stats |= _stats(labels, parts, names, head, tail)
    stats["bad_images"] = [{"image": i, "error": r} for i, r in bad]
    stats["split"] = {"fractions": dict(zip(names, fractions, strict=True)), "seed": seed}
    _write(out, labels, parts, names, stats, images)
    for line in split_shortfalls(stats):
        logger.warning("%s", line)
    return stats


def _stats(labels: LabelSet, parts: list[np.ndarray], names: Sequence[str], head: int, tail: int) -> dict:
    Y = labels.targets == 1
    train = Y[parts[0]].sum(axis=0)
    groups = class_groups(train, head, tail)
    nonzero = train[train > 0]
    return {
        "images": {"total": len(labels)} | {n: len(p) for n, p in zip(names, parts, strict=True)},
        "num_classes": labels.num_classes,
        "class_counts": split_counts(Y, parts, labels.classnames, names),
        "train_class_counts": {c: int(n) for c, n in zip(labels.classnames, train, strict=True)},
        "groups": {
            g: [c for c, gc in zip(labels.classnames, groups, strict=True) if gc == g]
            for g in ("head", "medium", "tail")
        },
        "group_thresholds": {"head": head, "tail": tail},
        "imbalance_ratio": float(nonzero.max() / nonzero.min()) if nonzero.size else None,
        "absent_classes": {
            n: [c for c, k in zip(labels.classnames, Y[p].sum(axis=0), strict=True) if k == 0]
            for n, p in zip(names, parts, strict=True)
        },
        "images_without_label": {"total": int((~Y.any(axis=1)).sum())}
        | {n: int((~Y[p].any(axis=1)).sum()) for n, p in zip(names, parts, strict=True)},
    }


def _write(
    out: Path, labels: LabelSet, parts: list[np.ndarray], names: Sequence[str], stats: dict, images: Path
) -> None:
    write_classes(out / "classes.txt", labels.classnames)
    fr, seed = stats["split"]["fractions"], stats["split"]["seed"]
    for name, part in zip(names, parts, strict=True):
        header = (
            f"{name} part of {stats['source']} (split {'/'.join(f'{f:g}' for f in fr.values())}, seed {seed}); "
            "image path<TAB>positive class indices (see classes.txt)"
        )
        write_label_list(out / f"{name}.txt", labels.subset(part), header=header)
    for stale in ("val.txt", "test.txt"):  # of an earlier import into this (cimlic-owned) folder
        if stale.removesuffix(".txt") not in names:
            (out / stale).unlink(missing_ok=True)
    bad_lines = [f"{b['image']}\t{b['error']}" for b in stats["bad_images"]]
    atomic_write_text(out / "bad_images.txt", "\n".join(["# image<TAB>why it cannot be read", *bad_lines]) + "\n")
    write_json(out / "stats.json", stats)
    data = {"name": out.resolve().name, "classes": str((out / "classes.txt").resolve())}
    data |= {f"{n}_labels": str((out / f"{n}.txt").resolve()) for n in names}
    data |= {"image_root": str(images.resolve()), "image_pattern": "{id}"}
    atomic_write_text(out / "data.yaml", yaml.safe_dump({"data": data}, sort_keys=False))
    logger.info("wrote %s: %s images", out, " / ".join(f"{len(p)} {n}" for n, p in zip(names, parts, strict=True)))


def format_split_table(stats: dict) -> str:
    """A short text table of the class counts per part (class, total, train[, val][, test]) and a summary line."""
    names = [n for n in ("train", "val", "test") if n in stats["images"]]
    counts = stats["class_counts"]
    width = min(max([len("class"), *map(len, counts)]), 32)
    lines = [f"{'class':<{width}} {'total':>7}" + "".join(f" {n:>7}" for n in names)]
    for cls, row in counts.items():
        label = cls if len(cls) <= width else cls[: width - 3] + "..."
        lines.append(f"{label:<{width}} {row['total']:>7}" + "".join(f" {row[n]:>7}" for n in names))
    g, ratio = stats["groups"], stats["imbalance_ratio"]
    parts = " / ".join(f"{stats['images'][n]} {n}" for n in names)
    summary = (
        f"{stats['images']['total']} images ({parts}), {stats['num_classes']} classes, head/medium/tail "
        f"{len(g['head'])}/{len(g['medium'])}/{len(g['tail'])}"
    )
    if ratio is not None:
        summary += f", imbalance ratio {ratio:.1f}"
    if stats["bad_images"]:
        summary += f"; {len(stats['bad_images'])} unreadable image(s) left out (bad_images.txt)"
    return "\n".join([*lines, summary])


def split_shortfalls(stats: dict) -> list[str]:
    """One line per part that lacks a class with at least as many images as there are parts (the repair's aim).

    A class with fewer images than parts cannot be in every part and is not named here; ``stats.json``'s
    ``absent_classes`` lists every class a part lacks.
    """
    n_parts = len(stats.get("absent_classes", {}))
    lines = []
    for part, missing in stats.get("absent_classes", {}).items():
        named = [c for c in missing if stats["class_counts"][c]["total"] >= n_parts]
        if named:
            shown = ", ".join(named[:8]) + (", ..." if len(named) > 8 else "")
            lines.append(
                f"{len(named)} class(es) with {n_parts} or more images have none in {part} (no image of theirs could "
                f"move there without taking another class out of its part; stats.json: absent_classes): {shown}"
            )
    return lines
