"""The predictions gallery: one self-contained page, escaped names, placeholders, sorting and filtering in Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest
from PIL import Image, ImageDraw

from cimlic.apps.gallery import GalleryError, write_gallery
from test_report import _headless, chromium  # noqa: F401  (chromium is a fixture)

HOSTILE = 'a<b & "c"'
CAFE = "caf\u00e9 \u2615"
CLASSES = ["cat", HOSTILE, CAFE]
THRESHOLDS = [0.5, 0.4, 0.6]
# file name -> (colour or None for an undecodable file, scores, predicted labels)
IMAGES = {
    "d_blue.jpg": ((20, 40, 220), [0.91, 0.12, 0.70], ["cat", CAFE]),
    "a_red.png": ((230, 20, 20), [0.20, 0.85, 0.30], [HOSTILE]),
    "c_none.png": ((200, 200, 30), [0.10, 0.33, 0.45], []),
    "b_broken.png": (None, [0.55, 0.05, 0.65], ["cat", CAFE]),
    "e_green.png": ((20, 180, 40), [0.52, 0.60, 0.05], ["cat", HOSTILE]),
}
BY_NAME = sorted(IMAGES)


def make_records(folder: Path) -> list[dict]:
    """Real image files (solid colours with a white square, one of them damaged) and their records, unsorted."""
    records = []
    for i, (name, (colour, scores, labels)) in enumerate(IMAGES.items()):
        path = folder / f"sub{i % 2}" / name  # two folders: cards are ordered by file name, not by path
        path.parent.mkdir(parents=True, exist_ok=True)
        if colour is None:
            path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        else:
            im = Image.new("RGB", (120, 80), colour)
            ImageDraw.Draw(im).rectangle((10, 10, 30, 30), fill=(255, 255, 255))
            im.save(path, quality=95) if name.endswith(".jpg") else im.save(path)
        records.append({"image": str(path), "scores": scores, "labels": labels})
    return records


class Cards(HTMLParser):
    """Each card's attributes, name title, chip texts and placeholder text; the class-count table rows."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict] = []
        self.rows: list[list[str]] = []
        self._text: list[str] | None = None
        self._where = ""
        self._in_table = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "article" and "card" in classes:
            self.cards.append({"attrs": a, "chips": [], "broken": None, "img": None, "title": None, "below": False})
        elif tag == "table" and a.get("id") == "class-counts":
            self._in_table = True
        elif self._in_table and tag == "tr":
            self.rows.append([])
        elif self._in_table and tag in ("td", "th"):
            self._text, self._where = [], "cell"
        elif self.cards and tag == "img":
            self.cards[-1]["img"] = a.get("src")
        elif self.cards and "chip" in classes:
            self._text, self._where = [], "chip"
        elif self.cards and "broken" in classes:
            self._text, self._where = [], "broken"
        elif self.cards and "below" in classes:
            self.cards[-1]["below"] = True
        elif self.cards and "name" in classes:
            self.cards[-1]["title"] = a.get("title")
            self._text, self._where = [], "name"

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_table = False
        if self._text is None:
            return
        text = " ".join("".join(self._text).split())
        if self._where == "cell" and tag in ("td", "th"):
            self.rows[-1].append(text)
        elif self._where == "chip" and tag == "span":
            self.cards[-1]["chips"].append(text)
        elif self._where in ("broken", "name") and tag == "div":
            self.cards[-1][self._where] = text
        else:
            return
        self._text = None

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)


def parse(page: str) -> Cards:
    parser = Cards()
    parser.feed(page)
    return parser


@pytest.fixture()
def gallery(tmp_path) -> tuple[Path, list[dict]]:
    records = make_records(tmp_path / "images")
    out = write_gallery(tmp_path / "out" / "gallery.html", records, CLASSES, THRESHOLDS, title="my <gallery>", thumb=48)
    return out, records


def test_gallery_page(gallery):
    out, records = gallery
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<title>my &lt;gallery&gt;</title>" in page
    assert "http://" not in page and "https://" not in page
    links = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, re.IGNORECASE)
    assert links and all(u.startswith("data:image/jpeg;base64,") for u in links)
    assert not re.search(r"<(link|iframe|object|embed)\b|<script\s+src", page, re.IGNORECASE)
    assert HOSTILE not in page and "a&lt;b &amp; &quot;c&quot;" in page and CAFE in page
    doc = parse(page)
    assert [c["attrs"]["data-name"] for c in doc.cards] == BY_NAME
    paths = {Path(r["image"]).name: r["image"] for r in records}
    for card in doc.cards:
        name = card["attrs"]["data-name"]
        _, scores, labels = IMAGES[name]
        assert card["title"] == paths[name] and card["name"] == name and "hidden" not in card["attrs"]
        assert json.loads(card["attrs"]["data-scores"]) == scores
        assert json.loads(card["attrs"]["data-labels"]) == [CLASSES.index(lab) for lab in labels]
        if labels:
            assert card["chips"] == [f"{lab} {scores[CLASSES.index(lab)]:.2f}" for lab in labels]
            assert not card["below"]
    none = doc.cards[BY_NAME.index("c_none.png")]
    assert none["chips"] == [f"{CAFE} 0.45", f"{HOSTILE} 0.33", "cat 0.10"] and none["below"]
    assert doc.rows == [["class", "threshold", "images labelled"], ["cat", "0.50", "3"], [HOSTILE, "0.40", "2"],
                        [CAFE, "0.60", "2"]]  # fmt: skip
    assert "5 image(s), 3 class(es), 4 image(s) with at least one label" in page
    assert not [p for p in out.parent.iterdir() if p.name != "gallery.html"]  # no temporary file left


def test_thumbnails_and_placeholder(gallery):
    out, _ = gallery
    doc = parse(out.read_text(encoding="utf-8"))
    broken = doc.cards[BY_NAME.index("b_broken.png")]
    assert broken["img"] is None and "cannot decode image" in broken["broken"] and "b_broken.png" in broken["broken"]
    assert broken["chips"] == ["cat 0.55", f"{CAFE} 0.65"]  # the scores are still shown
    for card in doc.cards:
        colour = IMAGES[card["attrs"]["data-name"]][0]
        if colour is None:
            continue
        data = base64.b64decode(card["img"].split(",", 1)[1])
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "JPEG" and im.size == (48, 32)  # 120x80 fitted into 48x48
            pixel = im.convert("RGB").getpixel((40, 24))  # away from the white square
        assert all(abs(p - c) < 30 for p, c in zip(pixel, colour, strict=True)), (card["attrs"]["data-name"], pixel)


def test_empty_gallery_and_missing_file(tmp_path):
    page = write_gallery(tmp_path / "empty.html", [], CLASSES, THRESHOLDS).read_text(encoding="utf-8")
    assert "no image" in page and not parse(page).cards and "0 image(s), 3 class(es)" in page
    missing = {"image": str(tmp_path / "gone.png"), "scores": [0.1, 0.2, 0.3], "labels": []}
    doc = parse(write_gallery(tmp_path / "g.html", [missing], CLASSES, THRESHOLDS).read_text(encoding="utf-8"))
    assert len(doc.cards) == 1 and "image file not found" in doc.cards[0]["broken"]


@pytest.mark.parametrize(
    "record, thresholds, match",
    [
        ({"image": "x.png", "scores": [0.1, 0.2], "labels": []}, THRESHOLDS, "3 finite scores expected"),
        ({"image": "x.png", "scores": [0.1, float("nan"), 0.2], "labels": []}, THRESHOLDS, "finite scores"),
        ({"image": "x.png", "scores": [0.1, 0.2, 0.3], "labels": ["dog"]}, THRESHOLDS, "not among the class names"),
        ({"scores": [0.1, 0.2, 0.3], "labels": []}, THRESHOLDS, "'image' path expected"),
        ({"image": "x.png", "scores": [0.1, 0.2, 0.3], "labels": []}, [0.5], "3 thresholds expected"),
    ],
)
def test_bad_records(tmp_path, record, thresholds, match):
    with pytest.raises(GalleryError, match=match):
        write_gallery(tmp_path / "g.html", [record], CLASSES, thresholds)
    assert not (tmp_path / "g.html").exists()


# ------------------------------------------------------------------------------------ headless Chromium
def _dom_order(browser: Path, profile: Path, url: str) -> list[tuple[str, bool]]:
    """(data-name, hidden) of every card in the DOM Chromium holds after loading ``url``."""
    dom = _headless(browser, profile, "--dump-dom", url).stdout
    return [(c["attrs"]["data-name"], "hidden" in c["attrs"]) for c in parse(dom).cards]


@pytest.mark.slow
def test_sorting_and_filtering_in_headless_chromium(chromium, gallery, tmp_path):  # noqa: F811
    out, _ = gallery
    assert _dom_order(chromium, tmp_path / "p0", out.as_uri()) == [(n, False) for n in BY_NAME]
    for k, name in enumerate(CLASSES):
        by_score = sorted(IMAGES, key=lambda n: -IMAGES[n][1][k])
        url = f"{out.as_uri()}#sort={quote(name, safe='')}"
        assert _dom_order(chromium, tmp_path / f"p{k}s", url) == [(n, False) for n in by_score], name
        hidden = [(n, name not in IMAGES[n][2]) for n in by_score]
        assert _dom_order(chromium, tmp_path / f"p{k}f", url + "&filter=labelled") == hidden, name
    only = _dom_order(chromium, tmp_path / "pany", f"{out.as_uri()}#filter=labelled")
    assert only == [(n, not IMAGES[n][2]) for n in BY_NAME]  # file-name order, unlabelled images hidden
    png = tmp_path / "gallery.png"
    url = f"{out.as_uri()}#sort={quote(HOSTILE, safe='')}"
    _headless(chromium, tmp_path / "pshot", f"--screenshot={png}", "--window-size=1000,700", "--hide-scrollbars", url)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (1000, 700)
    with Image.open(png) as image:
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, chips and thumbnails: not a blank page
    assert any(r > 180 and g < 60 and b < 60 for _, (r, g, b) in colours)  # the red thumbnail is drawn
