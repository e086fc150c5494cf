"""Readers of VOC XML trees, COCO JSON and CSV; `cimlic prepare` on tiny real-format trees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cimlic.apps.cli import main
from cimlic.data.dataset import ImageFileError, MultiLabelDataset, default_transform, load_image
from cimlic.data.formats import VOC_CLASSES, read_coco, read_csv_labels, read_voc
from cimlic.data.labels import LabelFileError, LabelSet, read_classes, read_label_list, write_label_list


def _jpeg(path: Path, seed: int, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, "JPEG")


def _voc_xml(objects: list[tuple[str, int]]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{d}</difficult>"
        "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax></bndbox></object>"
        for n, d in objects
    )
    size = "<size><width>40</width><height>30</height><depth>3</depth></size>"
    return f"<annotation><folder>VOC</folder>{size}{objs}</annotation>"


def make_voc(root: Path, year: str, image_set: str, annotations: dict[str, list[tuple[str, int]]]) -> Path:
    """A VOCdevkit/VOC<year> tree with real XML and JPEG files."""
    d = root / "VOCdevkit" / f"VOC{year}"
    (d / "Annotations").mkdir(parents=True, exist_ok=True)
    (d / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for k, (image_id, objs) in enumerate(annotations.items()):
        (d / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(objs))
        _jpeg(d / "JPEGImages" / f"{image_id}.jpg", k)
    (d / "ImageSets" / "Main" / f"{image_set}.txt").write_text("\n".join(annotations) + "\n")
    return d


@pytest.fixture()
def voc_trees(tmp_path):
    rng = np.random.default_rng(0)
    train = {}
    for i in range(200):  # every class present; person in most images
        names = list(rng.choice(VOC_CLASSES, size=int(rng.integers(2, 5)), replace=False))
        if rng.random() < 0.6 and "person" not in names:
            names.append("person")
        train[f"2008_{i:06d}"] = [(n, int(rng.random() < 0.1)) for n in names]
    test = {f"{i:06d}": [("cat", 1)] if i % 2 else [("dog", 0), ("person", 0)] for i in range(1, 9)}
    return make_voc(tmp_path, "2012", "trainval", train), make_voc(tmp_path, "2007", "test", test)


def test_read_voc_difficult_modes(voc_trees):
    _, d07 = voc_trees
    cat, dog, person = (VOC_CLASSES.index(n) for n in ("cat", "dog", "person"))
    pos = read_voc(d07, "test", "2007")
    assert pos.ids[:2] == ["000001", "000002"]
    assert pos.targets[0, cat] == 1 and pos.targets[1, dog] == 1 and pos.targets[1, person] == 1
    assert read_voc(d07, "test", "2007", difficult="negative").targets[0, cat] == 0
    assert read_voc(d07, "test", "2007", difficult="ignore").targets[0, cat] == -1
    assert read_voc(d07.parent.parent, "test", "2007").ids == pos.ids  # a parent folder is accepted


def test_read_voc_errors(voc_trees):
    d12, _ = voc_trees
    xml = d12 / "Annotations" / "2008_000001.xml"
    xml.write_text(_voc_xml([("zebra", 0)]))
    with pytest.raises(LabelFileError, match=r"2008_000001.xml: unknown class name 'zebra'"):
        read_voc(d12, "trainval", "2012")
    xml.write_text("<annotation><object><name>dog</name>")
    with pytest.raises(LabelFileError, match=r"2008_000001.xml: malformed XML"):
        read_voc(d12, "trainval", "2012")
    xml.unlink()
    with pytest.raises(LabelFileError, match=r"2008_000001.xml: annotation file not found"):
        read_voc(d12, "trainval", "2012")
    with pytest.raises(LabelFileError, match="val.txt: image-set file not found"):
        read_voc(d12, "val", "2012")
    with pytest.raises(LabelFileError, match="not a VOC2012 folder"):
        read_voc(d12 / "JPEGImages", "trainval", "2012")


def test_prepare_voc_lt_regenerated_and_split_file(voc_trees, tmp_path, capsys):
    d12, d07 = voc_trees
    out = tmp_path / "out"
    argv = ["prepare", "voc-lt", "--voc2012", str(d12), "--voc2007", str(d07), "--n-max", "30", "--out", str(out)]
    assert main(argv) == 0
    stats = json.loads((out / "stats.json").read_text())
    classes = read_classes(out / "classes.txt")
    train = read_label_list(out / "train.txt", classes)
    assert classes == VOC_CLASSES and stats["train_images"] == len(train) and stats["test_images"] == 8
    assert len(train) < 200 and stats["max_class"] == "person"
    assert "train" in capsys.readouterr().out
    # the same ids through --split-file give the same lists
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(train.ids) + "\n")
    out2 = tmp_path / "out2"
    assert main([*argv[:-2], "--split-file", str(ids_file), "--out", str(out2)]) == 0
    assert (out2 / "train.txt").read_text() == (out / "train.txt").read_text()
    data_yaml = (out / "data.yaml").read_text()
    assert "JPEGImages/{id}.jpg" in data_yaml and str(d07.resolve()) in data_yaml


def test_prepare_voc_lt_errors(voc_trees, tmp_path, capsys):
    d12, d07 = voc_trees
    base = ["prepare", "voc-lt", "--voc2012", str(d12), "--voc2007", str(d07), "--out", str(tmp_path / "o")]
    assert main(base) == 2  # n_max 800 is more than this pool allows
    assert "needs" in capsys.readouterr().err
    (d07 / "JPEGImages" / "000003.jpg").unlink()
    assert main([*base, "--n-max", "30"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("000003.jpg: image file not found (1 missing in all)") and "\n" not in err
    bad_ids = tmp_path / "ids.txt"
    bad_ids.write_text("2008_999999\n")
    assert main([*base, "--split-file", str(bad_ids), "--no-image-check"]) == 2
    assert "ids.txt: 1 id(s) not in the pool" in capsys.readouterr().err
    assert main(["prepare", "voc-lt", "--voc2012", str(d12), "--out", "x"]) == 2
    assert "needs --voc2007" in capsys.readouterr().err


def make_coco(root: Path, split: str, images: list[tuple[int, int, int]], anns: list[tuple[int, int, list]]) -> Path:
    """annotations/instances_<split>.json + <split>/ JPEGs. images: (id, w, h); anns: (image, cat, bbox)."""
    cats = [{"id": cid, "name": name} for cid, name in ((1, "person"), (3, "car"), (18, "dog"))]
    data = {
        "images": [{"id": i, "width": w, "height": h, "file_name": f"{i:012d}.jpg"} for i, w, h in images],
        "annotations": [
            {"id": k, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for k, (im, c, b) in enumerate(anns)
        ],
        "categories": cats,
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(data))
    for i, w, h in images:
        _jpeg(root / split / f"{i:012d}.jpg", i, (w, h))
    return path


def test_read_coco_rules(tmp_path):
    images = [(5, 40, 40), (2, 40, 40), (9, 40, 20)]
    anns = [
        (5, 18, [0, 0, 5, 5]),
        (5, 1, [0, 0, 0.5, 5]),
        (2, 3, [0, 0, 2, 2]),
        (2, 1, [0, 0, 3, 0]),
        (9, 1, [1, 1, 3, 3]),
    ]
    path = make_coco(tmp_path, "val2017", images, anns)
    labels, files = read_coco(path)
    assert labels.classnames == ["person", "car", "dog"]  # ascending category id
    assert labels.ids == ["000000000002", "000000000005", "000000000009"]  # ascending image id
    np.testing.assert_array_equal(labels.targets, [[0, 1, 0], [0, 0, 1], [1, 0, 0]])  # w<1 / h<1 dropped
    assert files["000000000002"] == "000000000002.jpg"
    small, _ = read_coco(path, min_side=32)
    assert small.ids == ["000000000002", "000000000005"]
    with pytest.raises(LabelFileError, match="3 categories but the class list has 2"):
        read_coco(path, ["a", "b"])
    path.write_text("{not json")
    with pytest.raises(LabelFileError, match="instances_val2017.json: malformed JSON"):
        read_coco(path)
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(LabelFileError, match="not a COCO instances file"):
        read_coco(path)


def test_prepare_coco_lt(tmp_path):
    rng = np.random.default_rng(0)
    images = [(i, 40, 36) for i in range(1, 41)] + [(99, 40, 20)]  # image 99 is below the 32 px pool rule
    anns = [(i, 1, [0, 0, 4, 4]) for i in range(1, 41) if rng.random() < 0.8]
    anns += [(i, 18, [0, 0, 4, 4]) for i in range(1, 41, 4)] + [(i, 3, [0, 0, 4, 4]) for i in range(2, 41, 7)]
    make_coco(tmp_path / "coco", "train2017", images, anns)
    make_coco(tmp_path / "coco", "val2017", [(100, 40, 40), (101, 40, 40)], [(100, 3, [0, 0, 4, 4])])
    out = tmp_path / "out"
    assert main(["prepare", "coco-lt", "--coco", str(tmp_path / "coco"), "--n-max", "25", "--out", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["test_images"] == 2 and stats["test_images_without_label"] == 1
    train = read_label_list(out / "train.txt", read_classes(out / "classes.txt"))
    assert "000000000099" not in train.ids and 0 < len(train) <= 40
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(str(int(i)) for i in train.ids[:5]) + "\n")  # integer ids as published
    out2 = tmp_path / "out2"
    assert (
        main(
            ["prepare", "coco-lt", "--coco", str(tmp_path / "coco"), "--split-file", str(ids_file), "--out", str(out2)]
        )
        == 0
    )
    assert read_label_list(out2 / "train.txt", train.classnames).ids == train.ids[:5]


def test_csv_and_plain_formats(tmp_path):
    classes = ["cat", "dog", "traffic light"]
    csv = tmp_path / "l.csv"
    csv.write_text('path,labels\nimgs/a.jpg,cat;traffic light\nimgs/b.jpg,\n"imgs/c,1.jpg",dog\n')
    labels = read_csv_labels(csv, classes)
    assert labels.ids == ["imgs/a.jpg", "imgs/b.jpg", "imgs/c,1.jpg"]
    np.testing.assert_array_equal(labels.targets, [[1, 0, 1], [0, 0, 0], [0, 1, 0]])
    csv.write_text("a.jpg,cat;zebra\n")
    with pytest.raises(LabelFileError, match=r"l.csv:1: unknown class name 'zebra'"):
        read_csv_labels(csv, classes)
    # the common whitespace "path idx idx" format and the TAB format with an unknown column
    plain = tmp_path / "p.txt"
    plain.write_text("imgs/a.jpg 0 2\nimgs/b.jpg\nc\t1\t0 2\n")
    labels = read_label_list(plain, classes)
    np.testing.assert_array_equal(labels.targets, [[1, 0, 1], [0, 0, 0], [-1, 1, -1]])
    write_label_list(tmp_path / "w.txt", labels)
    again = read_label_list(tmp_path / "w.txt", classes)
    assert again.ids == labels.ids and (again.targets == labels.targets).all()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a\t0 7\n", r"p.txt:1: class index 7 out of range 0..2"),
        ("a\tx\n", r"p.txt:1: class index 'x' is not an integer"),
        ("a\t0\nb\t1\na\t2\n", r"p.txt:3: image id 'a' repeats line 1"),
        ("# only a comment\n", r"p.txt: no image in label list"),
        ("a\t0\t0\n", r"p.txt:1: a class is both positive and unknown"),
    ],
)
def test_label_list_errors(tmp_path, text, message):
    path = tmp_path / "p.txt"
    path.write_text(text)
    with pytest.raises(LabelFileError, match=message):
        read_label_list(path, ["a", "b", "c"])


def test_classes_errors(tmp_path):
    with pytest.raises(LabelFileError, match="nope.txt: class file not found"):
        read_classes(tmp_path / "nope.txt")
    (tmp_path / "c.txt").write_text("a\nb\na\n")
    with pytest.raises(LabelFileError, match=r"duplicate class names \['a'\]"):
        read_classes(tmp_path / "c.txt")


def test_dataset_items_and_image_errors(tmp_path):
    _jpeg(tmp_path / "ok.jpg", 0)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    labels = LabelSet(["ok", "bad", "gone"], [[1, 0], [0, 1], [-1, 1]], ["a", "b"])
    ds = MultiLabelDataset(labels, tmp_path, "{id}.jpg", default_transform(32))
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["index"] == 0
    assert item["target"].tolist() == [1.0, 0.0]
    assert ds.missing_images() == [tmp_path / "gone.jpg"]
    with pytest.raises(ImageFileError, match=r"bad.jpg: cannot decode image"):
        ds[1]
    with pytest.raises(ImageFileError, match=r"gone.jpg: image file not found"):
        load_image(ds.image_path(2))


def test_prepare_voc07_and_coco_full(tmp_path):
    from cimlic.data.prepare import prepare_coco_full, prepare_voc07

    make_voc(tmp_path, "2007", "trainval", {"000005": [("chair", 0)], "000007": [("car", 0), ("person", 1)]})
    d07 = make_voc(tmp_path, "2007", "test", {"000001": [("dog", 0)]})
    stats = prepare_voc07(d07, tmp_path / "v", difficult="negative")
    assert (stats["train_images"], stats["test_images"]) == (2, 1)
    assert main(["prepare", "voc07", "--voc2007", str(d07), "--out", str(tmp_path / "v2")]) == 0
    assert read_label_list(tmp_path / "v2" / "train.txt", VOC_CLASSES).positives(1) == [6, 14]  # car, person
    train = read_label_list(tmp_path / "v" / "train.txt", VOC_CLASSES)
    assert train.positives(1) == [VOC_CLASSES.index("car")]  # the difficult person is negative here
    make_coco(tmp_path / "coco", "train2014", [(1, 40, 40), (2, 40, 40)], [(1, 1, [0, 0, 4, 4]), (2, 18, [0, 0, 4, 4])])
    make_coco(tmp_path / "coco", "val2014", [(3, 40, 40)], [(3, 3, [0, 0, 4, 4])])
    stats = prepare_coco_full(tmp_path / "coco", tmp_path / "c", year="2014")
    assert (stats["train_images"], stats["test_images"]) == (2, 1)
    assert read_classes(tmp_path / "c" / "classes.txt") == ["person", "car", "dog"]
