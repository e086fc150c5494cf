"""cimlic import: a user's own tagged images (tags / one-hot CSV, HF metadata, VOC, COCO) to label lists."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cimlic.config import load_config
from cimlic.data.dataset import ImageFileError
from cimlic.data.imports import (
    detect_format,
    read_coco_file,
    read_hf_metadata,
    read_onehot_csv,
    read_tagged,
    read_tags_csv,
    read_voc_folder,
)
from cimlic.data.labels import LabelFileError, read_classes, read_label_list
from cimlic.data.prepare import format_split_table, prepare_tagged, split_shortfalls, unreadable_images
from cimlic.data.stratify import SplitError, part_sizes, split_counts, stratified_split
from cimlic.errors import ConfigError
from cimlic.io import WriteError

pytestmark = pytest.mark.usefixtures("one_thread")


def image(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    """A real 16x16 RGB image (PNG or JPEG by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def assert_labels(labels, ids, targets, classnames) -> None:
    assert labels.ids == ids
    assert labels.classnames == classnames
    np.testing.assert_array_equal(labels.targets, np.array(targets, dtype=np.int8).reshape(len(ids), len(classnames)))


# --------------------------------------------------------------------------------------------- tags
def test_tags_csv_semicolons_header_quoted_path_empty_tags(tmp_path):
    f = write(tmp_path / "tags.csv", 'path,tags\na.png,cat;dog\nsub/b.jpg,dog\n"c,1.png",\n./d.png,bird; cat\n')
    labels = read_tags_csv(f)
    assert_labels(
        labels,
        ["a.png", "sub/b.jpg", "c,1.png", "d.png"],
        [[0, 1, 1], [0, 0, 1], [0, 0, 0], [1, 1, 0]],
        ["bird", "cat", "dog"],
    )
    assert labels.source == str(f)


def test_tags_csv_spaces_no_header_comments(tmp_path):
    f = write(tmp_path / "tags.csv", "# my tags\na.png,cat dog\n\nb.png,  dog \nc.png\n")
    assert_labels(read_tags_csv(f), ["a.png", "b.png", "c.png"], [[1, 1], [0, 1], [0, 0]], ["cat", "dog"])


def test_tags_csv_indices_and_names_with_classes_file(tmp_path):
    classes = read_classes(write(tmp_path / "classes.txt", "cat\ndog\nbird\n"))
    f = write(tmp_path / "tags.csv", "image,labels\na.png,0 2\nb.png,1\nc.png,cat 1\n")
    assert_labels(
        read_tags_csv(f, classes),
        ["a.png", "b.png", "c.png"],
        [[1, 0, 1], [0, 1, 0], [1, 1, 0]],
        ["cat", "dog", "bird"],
    )


def test_tags_csv_explicit_separator(tmp_path):
    f = write(tmp_path / "tags.csv", "a.png,big cat|dog\n")
    assert_labels(read_tags_csv(f, sep="|"), ["a.png"], [[1, 1]], ["big cat", "dog"])


@pytest.mark.parametrize(
    ("text", "classes", "message"),
    [
        ("path,tags\na.png,cat\nb.png,zebra\n", ["cat", "dog"], "file.csv:3: unknown class name 'zebra'; valid: cat"),
        ("a.png,cat\nb.png,dog\n./a.png,dog\n", None, "file.csv:3: image 'a.png' is listed twice (lines 1 and 3)"),
        ("a.png,cat\nb.png,cat,dog\n", None, "file.csv:2: expected 2 fields 'path,tags', got 3"),
        ("a.png,0 1\n", None, "file.csv:1: class index 0 needs a class list"),
        ("a.png,cat\n/data/b.png,cat\n", None, "file.csv:2: image path '/data/b.png' is absolute; give paths relative"),
        ('"a\tb.png",cat\n', None, "file.csv:1: image path 'a\\tb.png' contains a TAB or line break"),
        ("a.png,5\n", ["cat", "dog"], "file.csv:1: class index 5 out of range 0..1"),
    ],
)
def test_tags_csv_errors(tmp_path, text, classes, message):
    f = write(tmp_path / "file.csv", text)
    with pytest.raises(LabelFileError, match=re.escape(message)):
        read_tags_csv(f, classes)


def test_tags_csv_unknown_name_suggests_close_match(tmp_path):
    f = write(tmp_path / "file.csv", "a.png,cats\n")
    with pytest.raises(LabelFileError, match=re.escape("did you mean 'cat'?")):
        read_tags_csv(f, ["cat", "dog"])


# ------------------------------------------------------------------------------------------- onehot
ONEHOT = "image,dog,cat,bird\na.png,1,1,0\nb.png,0.0,1.0,0\nc.png,0,0,0\n"


def test_onehot_csv(tmp_path):
    f = write(tmp_path / "onehot.csv", ONEHOT)
    assert_labels(
        read_onehot_csv(f), ["a.png", "b.png", "c.png"], [[1, 1, 0], [0, 1, 0], [0, 0, 0]], ["dog", "cat", "bird"]
    )


def test_onehot_csv_reordered_to_class_list(tmp_path):
    f = write(tmp_path / "onehot.csv", ONEHOT)
    assert_labels(
        read_onehot_csv(f, ["bird", "cat", "dog"]),
        ["a.png", "b.png", "c.png"],
        [[0, 1, 1], [0, 1, 0], [0, 0, 0]],
        ["bird", "cat", "dog"],
    )


def test_onehot_csv_errors(tmp_path):
    f = write(tmp_path / "onehot.csv", "path,dog,cat\na.png,1,0\nb.png,0,2\n")
    with pytest.raises(LabelFileError, match=re.escape("onehot.csv:3: value '2' in column 'cat' is not 0 or 1")):
        read_onehot_csv(f)
    g = write(tmp_path / "ok.csv", "path,dog,cat\na.png,1,0\n")
    message = "ok.csv:1: the class columns differ from the class list (missing: ['bird']; not in the class list: none)"
    with pytest.raises(LabelFileError, match=re.escape(message)):
        read_onehot_csv(g, ["dog", "cat", "bird"])
    h = write(tmp_path / "dup.csv", "path,dog,dog\na.png,1,0\n")
    with pytest.raises(LabelFileError, match=re.escape("dup.csv:1: duplicate class columns ['dog']")):
        read_onehot_csv(h)


# ----------------------------------------------------------------------------------------------- HF
def jsonl(path: Path, *lines) -> Path:
    return write(path, "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def test_hf_metadata_names_single_label_and_ints(tmp_path):
    f = jsonl(
        tmp_path / "metadata.jsonl",
        {"file_name": "a.png", "labels": ["cat", "dog"]},
        {"file_name": "b.png", "labels": []},
        {"file_name": "./c.png", "label": "dog"},
    )
    assert_labels(read_hf_metadata(f), ["a.png", "b.png", "c.png"], [[1, 1], [0, 0], [0, 1]], ["cat", "dog"])
    g = jsonl(tmp_path / "ints.jsonl", {"file_name": "a.png", "labels": [0, 2]}, {"file_name": "b.png", "tags": 1})
    assert_labels(
        read_hf_metadata(g, ["cat", "dog", "bird"]), ["a.png", "b.png"], [[1, 0, 1], [0, 1, 0]], ["cat", "dog", "bird"]
    )
    h = jsonl(tmp_path / "field.jsonl", {"file_name": "a.png", "objects": ["cat"], "labels": ["dog"]})
    assert_labels(read_hf_metadata(h, field="objects"), ["a.png"], [[1]], ["cat"])


@pytest.mark.parametrize(
    ("line2", "message"),
    [
        ('{"file_name": "b.png", "labels": [', "meta.jsonl:2: malformed JSON"),
        ({"labels": ["cat"]}, "meta.jsonl:2: no 'file_name'"),
        ({"file_name": "b.png", "labels": {"cat": 1}}, "meta.jsonl:2: 'labels' is not a list of labels (got dict)"),
        ({"file_name": "b.png", "labels": [0]}, "meta.jsonl:2: class index 0 needs a class list"),
    ],
)
def test_hf_metadata_errors(tmp_path, line2, message):
    f = jsonl(tmp_path / "meta.jsonl", {"file_name": "a.png", "labels": ["cat"]}, line2)
    with pytest.raises(LabelFileError, match=re.escape(message)):
        read_hf_metadata(f)


# ------------------------------------------------------------------------------------------ VOC, COCO
def voc_xml(filename: str | None, *objects: tuple[str, int]) -> str:
    objs = "".join(f"<object><name>{n}</name><difficult>{d}</difficult></object>" for n, d in objects)
    name = f"<filename>{filename}</filename>" if filename else ""
    return f"<annotation><folder>x</folder>{name}{objs}</annotation>"


def test_voc_folder(tmp_path):
    ann = tmp_path / "ann"
    write(ann / "0001.xml", voc_xml("0001.png", ("cat", 0), ("dog", 1), ("cat", 0)))
    write(ann / "0002.xml", voc_xml(None, ("person", 0)))
    write(ann / "notes.txt", "not an annotation")
    assert_labels(read_voc_folder(ann), ["0001.png", "0002.jpg"], [[1, 1, 0], [0, 0, 1]], ["cat", "dog", "person"])
    assert_labels(
        read_voc_folder(ann, ["person", "dog", "cat", "bird"]),
        ["0001.png", "0002.jpg"],
        [[0, 1, 1, 0], [1, 0, 0, 0]],
        ["person", "dog", "cat", "bird"],
    )
    with pytest.raises(LabelFileError, match=re.escape("0001.xml: unknown class name 'dog'")):
        read_voc_folder(ann, ["cat", "person"])


def coco(path: Path, files: list[str]) -> Path:
    data = {
        "images": [{"id": k + 1, "file_name": f, "width": 16, "height": 16} for k, f in enumerate(files)][::-1],
        "categories": [{"id": 3, "name": "dog"}, {"id": 1, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 4, 4], "area": 16},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 4, 4], "area": 16},
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [0, 0, 0, 0], "area": 0},  # empty box: not a label
        ],
    }
    return write(path, json.dumps(data))


def test_coco_file(tmp_path):
    f = coco(tmp_path / "instances.json", ["a.png", "x/b.jpg"])
    assert_labels(read_coco_file(f), ["a.png", "x/b.jpg"], [[0, 1], [1, 0]], ["cat", "dog"])
    assert_labels(read_coco_file(f, ["dog", "cat"]), ["a.png", "x/b.jpg"], [[1, 0], [0, 1]], ["dog", "cat"])
    same_stem = coco(tmp_path / "stems.json", ["cat/1.jpg", "dog/1.jpg"])
    assert read_coco_file(same_stem).ids == ["cat/1.jpg", "dog/1.jpg"]
    with pytest.raises(LabelFileError, match=re.escape("(missing: ['bird']; not in the class list: ['dog'])")):
        read_coco_file(f, ["cat", "bird"])


# ------------------------------------------------------------------------------------------- detect
def test_detect_format_and_dispatch(tmp_path):
    tags = write(tmp_path / "tags.csv", "a.png,cat dog\n")
    onehot = write(tmp_path / "onehot.csv", ONEHOT)
    hf = jsonl(tmp_path / "metadata.jsonl", {"file_name": "a.png", "labels": ["cat"]})
    ann = tmp_path / "ann"
    write(ann / "1.xml", voc_xml("1.png", ("cat", 0)))
    js = coco(tmp_path / "instances.json", ["a.png", "b.png"])
    found = {p.name: detect_format(p) for p in (tags, onehot, hf, ann, js)}
    assert found == {
        "tags.csv": "tags",
        "onehot.csv": "onehot",
        "metadata.jsonl": "hf",
        "ann": "voc",
        "instances.json": "coco",
    }
    assert read_tagged(onehot).classnames == ["dog", "cat", "bird"]
    with pytest.raises(LabelFileError, match="expected 2 fields"):
        read_tagged(onehot, "tags")
    odd = write(tmp_path / "odd.csv", "path,a,b\nx.png,yes,no\n")
    with pytest.raises(LabelFileError, match=re.escape("give --format (one of tags, onehot, hf, voc, coco)")):
        detect_format(odd)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LabelFileError, match=re.escape("give --format")):
        detect_format(tmp_path / "empty")
    with pytest.raises(ConfigError, match=re.escape("--format: unknown format 'xls'")):
        read_tagged(tags, "xls")


# ------------------------------------------------------------------------------------------- images
def test_unreadable_images_are_reported_unreadable_files(tmp_path):
    image(tmp_path / "good.png")
    image(tmp_path / "sub" / "good.jpg")
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, format="PNG")
    (tmp_path / "trunc.png").write_bytes(buf.getvalue()[:40])
    write(tmp_path / "fake.jpg", "this is text, not a JPEG")
    (tmp_path / "album.jpg").mkdir()
    ids = ["good.png", "trunc.png", "missing.png", "sub/good.jpg", "fake.jpg", "album.jpg"]
    bad = unreadable_images(tmp_path, ids, progress=False)
    assert [i for i, _ in bad] == ["trunc.png", "missing.png", "fake.jpg", "album.jpg"]
    reasons = dict(bad)
    assert reasons["album.jpg"] == "is a folder, not an image file"
    assert reasons["missing.png"] == "image file not found"
    assert reasons["trunc.png"].startswith("cannot decode image")
    assert reasons["fake.jpg"].startswith("cannot decode image")
    assert unreadable_images(tmp_path, ["good.png", "sub/good.jpg"], progress=False) == []


# ---------------------------------------------------------------------------------------- stratify
def long_tailed(seed: int = 0, n: int = 600, counts=None) -> np.ndarray:
    """(N, C) multi-label matrix with class counts from 300 down to 4 (classes drawn independently)."""
    rng = np.random.default_rng(seed)
    counts = np.round(np.geomspace(300, 4, 12)).astype(int) if counts is None else np.asarray(counts)
    Y = np.zeros((n, len(counts)), dtype=np.int8)
    for c, k in enumerate(counts):
        Y[rng.choice(n, k, replace=False), c] = 1
    return Y


def deviation(Y: np.ndarray, parts, fractions) -> float:
    """Mean over classes and parts of |share of the class's images in the part - the part's fraction|."""
    total = (Y == 1).sum(axis=0)
    return float(np.mean([np.abs((Y[p] == 1).sum(axis=0) / total - f) for p, f in zip(parts, fractions, strict=True)]))


def test_stratified_split_long_tail():
    fr = (0.7, 0.1, 0.2)
    Y = long_tailed(0)
    Y[5, 0] = -1  # unknown counts as negative
    parts = stratified_split(Y, fr, seed=0)
    assert all(np.all(np.diff(p) > 0) and p.dtype == np.int64 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(600))
    assert part_sizes(600, fr) == [420, 60, 120]
    assert all(abs(len(p) - s) <= 5 for p, s in zip(parts, (420, 60, 120), strict=True))
    again = stratified_split(Y, fr, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = stratified_split(Y, fr, seed=1)
    assert not all(len(a) == len(b) and np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    counts = np.stack([(Y[p] == 1).sum(axis=0) for p in parts])  # (3, C)
    assert (counts[:, (Y == 1).sum(axis=0) >= 3] > 0).all()
    perm = np.random.default_rng(0).permutation(600)
    random_parts = [perm[:420], perm[420:480], perm[480:]]
    assert deviation(Y, parts, fr) < deviation(Y, random_parts, fr)


def test_stratified_split_rare_class_and_edges():
    Y = long_tailed(1, n=200, counts=[100, 40, 9, 3, 2, 1])
    parts = stratified_split(Y, (0.7, 0.1, 0.2), seed=0)
    counts = np.stack([Y[p].sum(axis=0) for p in parts])
    assert (counts[:, :4] > 0).all()  # 3 or more images: in every part
    assert (counts[:, 4] > 0).sum() == 2 and counts[0, 4] == 1 and counts[2, 4] == 1  # 2 images: train and test
    assert counts[0, 5] == 1  # 1 image: in train
    whole = stratified_split(Y, (1.0,))
    assert len(whole) == 1 and np.array_equal(whole[0], np.arange(200))
    unlabeled = stratified_split(np.zeros((10, 3)), (0.5, 0.5), seed=0)
    assert sorted(map(len, unlabeled)) == [5, 5]
    tiny = stratified_split(np.eye(3, dtype=np.int8), (0.8, 0.1, 0.1))
    assert sorted(int(i) for p in tiny for i in p) == [0, 1, 2] and all(len(p) == 1 for p in tiny)
    with pytest.raises(SplitError, match=re.escape("2 image(s) cannot fill 3 split parts")):
        stratified_split(np.eye(2), (0.8, 0.1, 0.1))
    with pytest.raises(SplitError, match="sum to 1"):
        stratified_split(Y, (0.5, 0.4))
    with pytest.raises(SplitError, match="positive"):
        stratified_split(Y, (1.2, -0.2))


def test_split_counts():
    Y = np.array([[1, 0], [1, 1], [0, 1], [-1, 1]])
    out = split_counts(Y, [np.array([0, 1]), np.array([2, 3])], ["a", "b"], ["train", "test"])
    assert out == {"a": {"train": 2, "test": 0, "total": 2}, "b": {"train": 1, "test": 2, "total": 3}}


# ------------------------------------------------------------------------------------------ prepare
def tagged_world(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """40 good PNGs + one corrupt file; cat = even, dog = multiple of 3, bird = multiple of 5 (some unlabelled)."""
    images = tmp_path / "images"
    rows, good = ["file_name,tags"], []
    for i in range(40):
        name = f"img{i:03d}.png" if i % 4 else f"sub/img{i:03d}.jpg"
        image(images / name, (i * 6, 100, 200 - i))
        tags = [t for t, m in (("cat", 2), ("dog", 3), ("bird", 5)) if i % m == 0]
        rows.append(f"{name},{';'.join(tags)}")
        good.append(name)
    write(images / "bad.png", "not an image")
    rows.append("bad.png,cat;dog")
    return write(tmp_path / "tags.csv", "\n".join(rows) + "\n"), images, good


def test_prepare_tagged_end_to_end(tmp_path, caplog):
    source, images, good = tagged_world(tmp_path)
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="cimlic.data.imports"):
        stats = prepare_tagged(source, images, out, split=(0.6, 0.2, 0.2), seed=0)
    assert "1 of 41 images cannot be read" in caplog.text and "bad.png" in caplog.text
    for name in ("classes.txt", "train.txt", "val.txt", "test.txt", "stats.json", "data.yaml", "bad_images.txt"):
        assert (out / name).is_file(), name
    assert json.loads((out / "stats.json").read_text()) == json.loads(json.dumps(stats))
    classes = read_classes(out / "classes.txt")
    assert classes == ["bird", "cat", "dog"]
    cfg = load_config(out / "data.yaml")
    assert cfg.data.image_root == str(images.resolve()) and cfg.data.image_pattern == "{id}"
    assert cfg.data.name == "out" and cfg.data.val_labels == str((out / "val.txt").resolve())
    lists = {p: read_label_list(getattr(cfg.data, f"{p}_labels"), classes) for p in ("train", "val", "test")}
    ids = [i for part in lists.values() for i in part.ids]
    assert sorted(ids) == sorted(good) and "bad.png" not in ids
    assert stats["images"] == {"total": 40} | {p: len(lists[p]) for p in lists}
    assert sum(stats["images"][p] for p in lists) == 40
    truth = {"bird": 8, "cat": 20, "dog": 14}
    for cls, row in stats["class_counts"].items():
        assert row["total"] == truth[cls] == sum(row[p] for p in lists)
        assert all(row[p] == lists[p].class_counts()[classes.index(cls)] for p in lists)
        assert all(row[p] > 0 for p in lists)
    train_counts = lists["train"].class_counts()
    assert stats["train_class_counts"] == dict(zip(classes, train_counts.tolist(), strict=True))
    assert stats["imbalance_ratio"] == train_counts.max() / train_counts.min()
    assert stats["groups"] == {"head": [], "medium": [], "tail": classes}
    assert stats["images_without_label"]["total"] == 40 - len({i for m in (2, 3, 5) for i in range(0, 40, m)})
    assert stats["bad_images"] == [{"image": "bad.png", "error": stats["bad_images"][0]["error"]}]
    assert stats["bad_images"][0]["error"].startswith("cannot decode image")
    assert "bad.png\tcannot decode image" in (out / "bad_images.txt").read_text()
    assert stats["split"] == {"fractions": {"train": 0.6, "val": 0.2, "test": 0.2}, "seed": 0}
    assert stats["format"] == "tags" and stats["absent_classes"] == {"train": [], "val": [], "test": []}
    table = format_split_table(stats).splitlines()
    assert table[0].split() == ["class", "total", "train", "val", "test"] and len(table) == 5
    assert table[1].split()[:2] == ["bird", "8"] and "1 unreadable image(s) left out" in table[-1]


def test_prepare_tagged_one_part_strict_and_refusals(tmp_path):
    source, images, _ = tagged_world(tmp_path)
    with pytest.raises(ImageFileError, match=re.escape(f"{images / 'bad.png'}: cannot decode image")):
        prepare_tagged(source, images, tmp_path / "strict", strict=True)
    stats = prepare_tagged(source, images, tmp_path / "one", split=(1.0,))
    data = yaml.safe_load((tmp_path / "one" / "data.yaml").read_text())["data"]
    assert list(data) == ["name", "classes", "train_labels", "image_root", "image_pattern"]
    assert stats["images"] == {"total": 40, "train": 40}
    assert stats["imbalance_ratio"] == 20 / 8
    mine = write(tmp_path / "mine" / "train.txt", "my own list\n")
    with pytest.raises(WriteError, match="holds files cimlic did not write"):
        prepare_tagged(source, images, tmp_path / "mine")
    assert mine.read_text() == "my own list\n" and sorted(p.name for p in mine.parent.iterdir()) == ["train.txt"]
    with pytest.raises(ConfigError, match=re.escape("--split: split fractions must sum to 1")):
        prepare_tagged(source, images, tmp_path / "x", split=(0.5, 0.4))
    only_bad = write(tmp_path / "only_bad.csv", "img001.png,cat\nbad.png,dog\n")
    with pytest.raises(
        LabelFileError, match=re.escape("class(es) ['dog'] appear only on images that cannot be read")
    ) as err:
        prepare_tagged(only_bad, images, tmp_path / "y", split=(1.0,))
    assert str(err.value).endswith("; fix those images")
    classes = write(tmp_path / "names.txt", "cat\ndog\n")
    with pytest.raises(LabelFileError, match=re.escape(f"fix those images or drop the class(es) from {classes}")):
        prepare_tagged(only_bad, images, tmp_path / "y", classes=classes)
    classes = write(tmp_path / "names.txt", "cat\ndog\nfish\n")
    good_only = write(tmp_path / "good_only.csv", "img001.png,cat\nimg002.png,dog\n")
    with pytest.raises(LabelFileError, match=re.escape(f"class(es) ['fish'] have no image (drop them from {classes})")):
        prepare_tagged(good_only, images, tmp_path / "y", classes=classes, split=(1.0,))
    assert not any((tmp_path / "y" / n).exists() for n in ("train.txt", "data.yaml", "stats.json"))


def test_prepare_tagged_warns_about_a_class_the_repair_cannot_place(tmp_path, caplog):
    """Class a's three images each carry a one-image class: moving one out of train would take that class away."""
    images = tmp_path / "images"
    rows = []
    for i in range(10):
        image(images / f"i{i}.png", (i * 20, 0, 0))
        rows.append(f"i{i}.png,{f'a;b{i}' if i < 3 else ''}")
    source = write(tmp_path / "tags.csv", "\n".join(rows) + "\n")
    with caplog.at_level("WARNING", logger="cimlic.data.prepare"):
        stats = prepare_tagged(source, images, tmp_path / "out", split=(0.7, 0.1, 0.2), seed=2)
    assert stats["class_counts"]["a"] == {"train": 3, "val": 0, "test": 0, "total": 3}
    assert stats["absent_classes"]["val"] == ["a", "b0", "b1", "b2"] and stats["absent_classes"]["train"] == []
    lines = split_shortfalls(stats)
    assert lines == [
        f"1 class(es) with 3 or more images have none in {part} (no image of theirs could move there without "
        f"taking another class out of its part; stats.json: absent_classes): a"
        for part in ("val", "test")
    ]
    assert all(line in caplog.text for line in lines)
