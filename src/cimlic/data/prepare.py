"""From official dataset folders to the toolkit's label lists: ``cimlic prepare voc-lt | coco-lt``.

Output folder: ``classes.txt``, ``train.txt``, ``test.txt`` (plain label lists), ``stats.json`` and
``data.yaml`` (the ``data:`` section of a config pointing at the lists and image folders).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import yaml

from cimlic.data.formats import VOC_CLASSES, Difficult, find_voc_year_dir, read_coco, read_voc
from cimlic.data.labels import (
    LabelFileError,
    LabelSet,
    read_id_list,
    write_classes,
    write_label_list,
)
from cimlic.data.splits import build_longtail
from cimlic.io import atomic_write_text, claim_output_folder, write_json

logger = logging.getLogger(__name__)

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
