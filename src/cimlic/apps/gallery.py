"""The predictions gallery: one self-contained HTML page with a thumbnail card per scored image.

Each card shows the image (a small JPEG embedded as a ``data:`` URI), its file name, the predicted labels with their
scores, or the three best scores marked "below threshold" when nothing is predicted. A small inline script sorts the
cards by one class's score and can hide the images not labelled with it; the initial view may be given in the URL
hash (``#sort=<class name>&filter=labelled``), so a link can open the page sorted. Nothing is loaded from elsewhere.

DOM conventions (kept stable for tests and tools): ``<select id="sort">`` (value "" = file name, else a class index),
``<select id="filter">`` ("all" / "labelled"), ``<div id="grid">`` holding one ``<article class="card">`` per image
with ``data-name`` (file name), ``data-scores`` (JSON array, aligned with the class names) and ``data-labels`` (JSON
array of predicted class indices); a filtered-out card carries the ``hidden`` attribute. The class names are in
``<script type="application/json" id="gallery-data">``.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from tqdm import tqdm

import cimlic
from cimlic.data.dataset import ImageFileError, load_image
from cimlic.errors import CimlicError
from cimlic.io import atomic_write_text

logger = logging.getLogger(__name__)

JPEG_QUALITY = 80
TOP_BELOW = 3  # best scores shown on a card without a predicted label
__all__ = ["GalleryError", "thumbnail_uri", "write_gallery"]


class GalleryError(CimlicError, ValueError):
    """The records do not fit the class names (a score list of the wrong length, an unknown label, ...)."""


@dataclass
class _Card:
    path: str
    name: str
    scores: list[float]  # (C,)
    labels: list[int]  # predicted class indices, in the record's order
    thumb: str | None  # data: URI, or None when the image could not be decoded
    error: str = ""


# ------------------------------------------------------------------------------------------- inputs
def _check_records(records: Sequence[dict], classnames: Sequence[str]) -> list[_Card]:
    index = {c: k for k, c in enumerate(classnames)}
    cards = []
    for n, rec in enumerate(records):
        if not isinstance(rec, dict) or "image" not in rec:
            raise GalleryError(f"record {n}: a dict with an 'image' path expected")
        path = str(rec["image"])
        scores = [float(s) for s in rec.get("scores", [])]
        if len(scores) != len(classnames) or not all(math.isfinite(s) for s in scores):
            raise GalleryError(f"{path}: {len(classnames)} finite scores expected (one per class), got {len(scores)}")
        unknown = [lab for lab in rec.get("labels", []) if lab not in index]
        if unknown:
            raise GalleryError(f"{path}: label(s) not among the class names: {', '.join(map(str, unknown[:5]))}")
        labels = list(dict.fromkeys(index[lab] for lab in rec.get("labels", [])))
        cards.append(_Card(path, Path(path).name, scores, labels, None))
    return sorted(cards, key=lambda c: (c.name, c.path))


def thumbnail_uri(path: str | os.PathLike, size: int = 160) -> str:
    """A ``data:image/jpeg;base64,...`` URI of the image at ``path`` shrunk to fit ``size`` x ``size`` pixels.

    Raises:
        ImageFileError: the file is missing or cannot be decoded.
    """
    im = load_image(path)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _add_thumbs(cards: list[_Card], size: int) -> None:
    def one(card: _Card) -> None:
        try:
            card.thumb = thumbnail_uri(card.path, size)
        except (ImageFileError, OSError, ValueError) as err:  # PIL's decoders raise these for damaged files
            card.error = " ".join(str(err).split())
            logger.warning("gallery: no thumbnail for %s", card.error)

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes outside the GIL
        bar = tqdm(pool.map(one, cards), total=len(cards), desc="thumbnails", unit="img", leave=False,
                   disable=len(cards) < 100)  # fmt: skip
        for _ in bar:
            pass


# ------------------------------------------------------------------------------------------ rendering
CSS = """
body{font:14px/1.45 system-ui,sans-serif;color:#222;margin:0;background:#fafafa}
main{max-width:1400px;margin:0 auto;padding:16px 24px 48px;background:#fff}
h1{font-size:22px;margin:8px 0 4px}.meta,.note{color:#666;font-size:12px}
table{border-collapse:collapse;margin:6px 0;font-size:13px}th,td{padding:2px 9px;border-bottom:1px solid #e6e6e6}
th{background:#f2f2f2;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
.controls{margin:12px 0;display:flex;gap:16px;align-items:center;flex-wrap:wrap}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(var(--w),1fr));gap:10px}
.card{border:1px solid #ddd;border-radius:6px;padding:6px;background:#fff;min-width:0}.card[hidden]{display:none}
.thumb{height:var(--t);display:flex;align-items:center;justify-content:center;background:#f4f4f4}
.thumb img{max-width:100%;max-height:100%}.thumb.broken{background:#fbeaea;color:#a33;font-size:11px;
overflow:auto;padding:4px;word-break:break-all;box-sizing:border-box}
.name{font-size:12px;margin:4px 0;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.chip{display:inline-block;margin:1px 2px;padding:0 6px;border-radius:9px;background:#e3edff;font-size:12px}
.chip.low{background:#eee;color:#666}.below{font-size:11px;color:#999}.empty{color:#666;font-style:italic}
details{margin:8px 0}
"""

SCRIPT = """
(function () {
  var classes = JSON.parse(document.getElementById("gallery-data").textContent).classes;
  var grid = document.getElementById("grid"), sortSel = document.getElementById("sort");
  var filterSel = document.getElementById("filter"), shown = document.getElementById("shown");
  var cards = Array.prototype.slice.call(grid.querySelectorAll(".card"));
  cards.forEach(function (c, i) {
    c._pos = i; c._scores = JSON.parse(c.dataset.scores); c._labels = JSON.parse(c.dataset.labels);
  });
  function apply() {
    var k = sortSel.value === "" ? -1 : parseInt(sortSel.value, 10), only = filterSel.value === "labelled", n = 0;
    var order = cards.slice().sort(function (a, b) {
      return k < 0 ? a._pos - b._pos : (b._scores[k] - a._scores[k]) || (a._pos - b._pos);
    });
    order.forEach(function (c) {
      var hide = only && (k < 0 ? c._labels.length === 0 : c._labels.indexOf(k) < 0);
      if (hide) { c.setAttribute("hidden", ""); } else { c.removeAttribute("hidden"); n++; }
      grid.appendChild(c);
    });
    if (shown) { shown.textContent = n + " of " + cards.length + " shown"; }
  }
  function fromHash() {
    var params = new URLSearchParams(location.hash.replace(/^#/, ""));
    var k = classes.indexOf(params.get("sort"));
    sortSel.value = k < 0 ? "" : String(k);
    filterSel.value = params.get("filter") === "labelled" ? "labelled" : "all";
    apply();
  }
  function toHash() {
    var parts = [];
    if (sortSel.value !== "") { parts.push("sort=" + encodeURIComponent(classes[+sortSel.value])); }
    if (filterSel.value === "labelled") { parts.push("filter=labelled"); }
    history.replaceState(null, "", parts.length ? "#" + parts.join("&") : location.pathname + location.search);
    apply();
  }
  sortSel.addEventListener("change", toHash);
  filterSel.addEventListener("change", toHash);
  window.addEventListener("hashchange", fromHash);
  fromHash();
})();
"""


def _attr_json(obj: Any) -> str:
    """JSON for a double-quoted HTML attribute."""
    return escape(json.dumps(obj, ensure_ascii=False, separators=(",", ":")), quote=True)


def _script_json(obj: Any) -> str:
    """JSON safe inside ``<script type="application/json">``: no ``</``, ``<!--`` or ``]]>`` can appear."""
    text = json.dumps(obj, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _chip(name: str, score: float, low: bool = False) -> str:
    cls = "chip low" if low else "chip"
    return f'<span class="{cls}">{escape(name)} <b>{score:.2f}</b></span>'


def _card_html(card: _Card, classnames: Sequence[str]) -> str:
    if card.thumb is not None:
        thumb = f'<div class="thumb"><img src="{card.thumb}" alt="{escape(card.name)}"></div>'
    else:
        thumb = f'<div class="thumb broken" role="img">cannot show the image: {escape(card.error)}</div>'
    if card.labels:
        chips = "".join(_chip(classnames[k], card.scores[k]) for k in card.labels)
    else:
        best = sorted(range(len(card.scores)), key=lambda k: -card.scores[k])[:TOP_BELOW]
        chips = "".join(_chip(classnames[k], card.scores[k], low=True) for k in best)
        chips += '<span class="below">below threshold</span>'
    scores = [round(s, 4) for s in card.scores]
    return (
        f'<article class="card" data-name="{escape(card.name)}" data-scores="{_attr_json(scores)}" '
        f'data-labels="{_attr_json(card.labels)}">{thumb}'
        f'<div class="name" title="{escape(card.path)}">{escape(card.name)}</div>'
        f'<div class="chips">{chips}</div></article>'
    )


def _class_table(classnames: Sequence[str], thresholds: Sequence[float], cards: Sequence[_Card]) -> str:
    counts = [0] * len(classnames)
    for card in cards:
        for k in card.labels:
            counts[k] += 1
    rows = "".join(
        f'<tr><td>{escape(c)}</td><td class="n">{t:.2f}</td><td class="n">{n}</td></tr>'
        for c, t, n in zip(classnames, thresholds, counts, strict=True)
    )
    head = "<thead><tr><th>class</th><th>threshold</th><th>images labelled</th></tr></thead>"
    table = f'<table id="class-counts">{head}<tbody>{rows}</tbody></table>'
    return f"<details open><summary>Predicted labels per class</summary>{table}</details>"


def _render(
    cards: Sequence[_Card], classnames: Sequence[str], thresholds: Sequence[float], title: str, thumb: int
) -> str:
    """The gallery page as an HTML string (see the module docstring for its content and DOM conventions)."""
    labelled = sum(1 for c in cards if c.labels)
    options = '<option value="">file name</option>' + "".join(
        f'<option value="{k}">{escape(c)}</option>' for k, c in enumerate(classnames)
    )
    body = "".join(_card_html(c, classnames) for c in cards) or '<p class="empty">no image</p>'
    return "".join(
        [
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>',
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>',
            f'<body><main style="--t:{thumb}px;--w:{thumb + 14}px"><h1>{escape(title)}</h1>',
            f'<p class="meta" id="summary">{len(cards)} image(s), {len(classnames)} class(es), {labelled} image(s) '
            f"with at least one label. Generated by cimlic {escape(cimlic.__version__)}.</p>",
            _class_table(classnames, thresholds, cards),
            '<div class="controls"><label>sort by <select id="sort">',
            options,
            '</select></label><label>show <select id="filter"><option value="all">all images</option>',
            '<option value="labelled">only images labelled with the class chosen</option></select></label>',
            f'<span class="note" id="shown">{len(cards)} of {len(cards)} shown</span></div>',
            f'<div id="grid">{body}</div></main>',
            f'<script type="application/json" id="gallery-data">{_script_json({"classes": list(classnames)})}</script>',
            f"<script>{SCRIPT}</script></body></html>\n",
        ]
    )


def write_gallery(
    out: str | os.PathLike,
    records: Sequence[dict],
    classnames: Sequence[str],
    thresholds: Sequence[float],
    title: str = "cimlic predictions",
    thumb: int = 160,
) -> Path:
    """Write the predictions gallery of ``records`` to ``out`` (one self-contained HTML file, written atomically).

    Args:
        out: the HTML file to write (its folder is created).
        records: one per scored image: ``{"image": path, "scores": C probabilities, "labels": predicted names}``.
            An empty sequence gives a valid page that says "no image"; an undecodable image gets a placeholder.
        classnames: the C class names, aligned with every record's scores.
        thresholds: the C per-class thresholds the labels were predicted with (shown in the class table).
        title: the page title.
        thumb: the largest side of the thumbnails, in pixels.

    Returns:
        ``out`` as a Path.

    Raises:
        GalleryError: a record without an image path, with the wrong number of scores or an unknown label, or
            thresholds not one per class.
        WriteError: ``out`` cannot be written.
    """
    classnames = [str(c) for c in classnames]
    thresholds = [float(t) for t in thresholds]
    if len(thresholds) != len(classnames):
        raise GalleryError(f"{len(classnames)} thresholds expected (one per class), got {len(thresholds)}")
    thumb = int(thumb)
    if thumb < 8:
        raise GalleryError(f"thumbnail size must be at least 8 pixels, got {thumb}")
    cards = _check_records(records, classnames)
    _add_thumbs(cards, thumb)
    page = _render(cards, classnames, thresholds, title, thumb)
    out = Path(out)
    atomic_write_text(out, page)
    broken = sum(1 for c in cards if c.thumb is None)
    logger.info("gallery of %d image(s) (%d without thumbnail) written to %s (%.2f MB)", len(cards), broken, out,
                len(page.encode("utf-8")) / 1e6)  # fmt: skip
    return out
