"""Readers of a practitioner's own tagged images (``cimlic import``).

Readers of the common ways people tag images, each into a :class:`LabelSet` whose ids are image paths relative to
the image folder (POSIX, no leading ``./``):

- ``tags``: a CSV of ``path,tags`` rows, tags separated by ``;`` or whitespace (class names or indices);
- ``onehot``: the Kaggle layout ``path,class_a,class_b,...`` with a header row and 0/1 values;
- ``hf``: a Hugging Face imagefolder ``metadata.jsonl`` (``file_name`` and a list of labels);
- ``voc``: a folder of Pascal VOC XML files; ``coco``: a COCO instances JSON.

:func:`cimlic.data.prepare.prepare_tagged` then checks that every image decodes, makes a stratified train / val /
test split (:mod:`cimlic.data.stratify`) and writes the lists, ``classes.txt``, ``stats.json`` and ``data.yaml``.
Every malformed input raises ``LabelFileError`` with one line naming the file (and line).
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import logging
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from tqdm import tqdm

from cimlic.data.formats import parse_voc_xml, read_coco
from cimlic.data.labels import LabelFileError, LabelSet
from cimlic.errors import ConfigError
from cimlic.io import read_json, read_text

logger = logging.getLogger(__name__)

FORMATS = ("tags", "onehot", "hf", "voc", "coco")
PATH_HEADERS = ("path", "image", "file", "filename", "file_name", "image_id", "id", "image_path")
TAG_HEADERS = ("tags", "labels", "label")
HF_FIELDS = ("labels", "label", "tags", "categories")
ONEHOT_VALUES = {"0": 0, "1": 1, "0.0": 0, "1.0": 1}


# ----------------------------------------------------------------------------------------- helpers
def _where(path: Path, lineno: int | None) -> str:
    return f"{path}:{lineno}" if lineno is not None else str(path)


def normalise_id(raw: str, path: Path, lineno: int | None = None) -> str:
    """An image path as a POSIX path relative to the image folder (no leading ``./``); LabelFileError if unusable."""
    where, text = _where(path, lineno), raw.strip()
    if not text:
        raise LabelFileError(f"{where}: empty image path")
    if any(ch in text for ch in "\t\n\r"):
        raise LabelFileError(f"{where}: image path {text!r} contains a TAB or line break")
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute():
        raise LabelFileError(f"{where}: image path {text!r} is absolute; give paths relative to the image folder")
    norm = PurePosixPath(text).as_posix()
    if norm.startswith("#"):
        raise LabelFileError(f"{where}: image path {norm!r} starts with '#' (read as a comment in label lists)")
    return norm


def _names_hint(name: str, classnames: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(classnames[:limit]) + (f", ... ({len(classnames)} in all)" if len(classnames) > limit else "")
    close = difflib.get_close_matches(name, classnames, n=1)
    return f"valid: {shown}" + (f"; did you mean {close[0]!r}?" if close else "")


def _class_index(classnames: Sequence[str], source: Path) -> dict[str, int]:
    dup = sorted(n for n, k in Counter(classnames).items() if k > 1)
    if dup:
        raise LabelFileError(f"{source}: duplicate class names {dup}")
    return {n: i for i, n in enumerate(classnames)}


def _as_index(tok: str | int) -> int | None:
    if isinstance(tok, int):
        return tok
    return int(tok) if re.fullmatch(r"[+-]?[0-9]+", tok) else None


def _resolve(tokens: Sequence[str | int], index: dict[str, int] | None, where: str) -> list:
    """Class indices of class names or integer indices; without a class list (``index`` None) names stay names."""
    out = []
    for tok in tokens:
        if index is not None and tok in index:
            out.append(index[tok])
            continue
        k = _as_index(tok)
        if k is None and index is None:
            out.append(tok)
        elif k is None:
            raise LabelFileError(f"{where}: unknown class name {tok!r}; {_names_hint(str(tok), list(index))}")
        elif index is None:
            raise LabelFileError(f"{where}: class index {k} needs a class list (give --classes classes.txt)")
        elif not 0 <= k < len(index):
            raise LabelFileError(f"{where}: class index {k} out of range 0..{len(index) - 1}")
        else:
            out.append(k)
    return out


def _build(rows: list[tuple[int | None, str, list]], classnames: Sequence[str] | None, source: Path) -> LabelSet:
    """A LabelSet from (line, id, labels) rows; labels are names (no class list) or indices; duplicates refused."""
    if not rows:
        raise LabelFileError(f"{source}: no image in this file")
    seen: dict[str, int | None] = {}
    for lineno, image_id, _ in rows:
        if image_id in seen:
            lines = f" (lines {seen[image_id]} and {lineno})" if lineno is not None else ""
            raise LabelFileError(f"{_where(source, lineno)}: image {image_id!r} is listed twice{lines}")
        seen[image_id] = lineno
    if classnames is None:
        classnames = sorted({name for _, _, labels in rows for name in labels})
        if not classnames:
            raise LabelFileError(f"{source}: no image has a label, so there is no class (give --classes)")
        col = {n: i for i, n in enumerate(classnames)}
        rows = [(ln, i, [col[n] for n in labels]) for ln, i, labels in rows]
    targets = np.zeros((len(rows), len(classnames)), dtype=np.int8)
    for r, (_, _, labels) in enumerate(rows):
        targets[r, labels] = 1
    return LabelSet([i for _, i, _ in rows], targets, list(classnames), source=str(source))


def _csv_rows(path: Path, what: str) -> list[tuple[int, list[str]]]:
    """(first line number, fields) of every CSV record that is neither blank nor a '#' comment."""
    reader = csv.reader(io.StringIO(read_text(path, LabelFileError, what), newline=""))
    out, start = [], 1
    try:
        for rec in reader:
            if rec and "".join(rec).strip() and not rec[0].lstrip().startswith("#"):
                out.append((start, rec))
            start = reader.line_num + 1
    except csv.Error as err:
        raise LabelFileError(f"{path}:{start}: malformed CSV ({err})") from None
    return out


# ----------------------------------------------------------------------------------------- readers
def read_tags_csv(path: str | os.PathLike, classnames: Sequence[str] | None = None, sep: str | None = None) -> LabelSet:
    """Labels from a CSV of ``path,tags`` rows (optional header row; '#' comments and blank lines skipped).

    Args:
        path: the CSV file; a path holding a comma must be quoted.
        classnames: the class list; tags may then be names or indices. Without it: the sorted names seen.
        sep: tag separator; None = ';' if any tag field holds one, else whitespace.
    """
    path = Path(path)
    records = _csv_rows(path, "tags CSV")
    if records:
        first = [f.strip().lower() for f in records[0][1]]
        if first[0] in PATH_HEADERS or (len(first) > 1 and first[1] in TAG_HEADERS):
            records = records[1:]
    for lineno, rec in records:
        if len(rec) > 2:
            raise LabelFileError(
                f"{path}:{lineno}: expected 2 fields 'path,tags', got {len(rec)} (quote a path holding a comma; "
                "separate tags with ';' or spaces; a one-hot CSV: --format onehot)"
            )
    if sep is None:
        sep = ";" if any(len(rec) > 1 and ";" in rec[1] for _, rec in records) else ""
    index = _class_index(classnames, path) if classnames is not None else None
    rows = []
    for lineno, rec in records:
        field = rec[1] if len(rec) > 1 else ""
        tokens = [t.strip() for t in (field.split(sep) if sep.strip() else field.split())]
        labels = _resolve([t for t in tokens if t], index, f"{path}:{lineno}")
        rows.append((lineno, normalise_id(rec[0], path, lineno), labels))
    return _build(rows, classnames, path)


def read_onehot_csv(path: str | os.PathLike, classnames: Sequence[str] | None = None) -> LabelSet:
    """Labels from a one-hot CSV: a header ``path,class_a,class_b,...`` and 0/1 values (also 0.0 / 1.0).

    With ``classnames`` the class columns must be exactly those classes (any order; reordered to ``classnames``).
    """
    path = Path(path)
    records = _csv_rows(path, "one-hot CSV")
    if not records:
        raise LabelFileError(f"{path}: no header row and no image")
    head_line, header = records[0]
    cols = [h.strip() for h in header[1:]]
    if not cols or all(c in ONEHOT_VALUES for c in cols):
        raise LabelFileError(f"{path}:{head_line}: a one-hot CSV needs a header row 'path,class_a,class_b,...'")
    if "" in cols:
        raise LabelFileError(f"{path}:{head_line}: column {cols.index('') + 2} of the header has no class name")
    dup = sorted(c for c, k in Counter(cols).items() if k > 1)
    if dup:
        raise LabelFileError(f"{path}:{head_line}: duplicate class columns {dup}")
    if classnames is not None:
        _class_index(classnames, path)
        missing, extra = [n for n in classnames if n not in cols], [c for c in cols if c not in set(classnames)]
        if missing or extra:
            raise LabelFileError(
                f"{path}:{head_line}: the class columns differ from the class list (missing: "
                f"{missing or 'none'}; not in the class list: {extra or 'none'})"
            )
    order = [cols.index(n) for n in classnames] if classnames is not None else list(range(len(cols)))
    rows = []
    for lineno, rec in records[1:]:
        if len(rec) != len(header):
            raise LabelFileError(f"{path}:{lineno}: expected {len(header)} fields like the header, got {len(rec)}")
        values = []
        for name, v in zip(cols, rec[1:], strict=True):
            if v.strip() not in ONEHOT_VALUES:
                raise LabelFileError(f"{path}:{lineno}: value {v!r} in column {name!r} is not 0 or 1")
            values.append(ONEHOT_VALUES[v.strip()])
        rows.append((lineno, normalise_id(rec[0], path, lineno), [j for j, k in enumerate(order) if values[k]]))
    return _build(rows, classnames if classnames is not None else cols, path)


def _hf_labels(obj: dict, field: str | None, where: str) -> list:
    keys = [field] if field is not None else [k for k in HF_FIELDS if k in obj]
    if not keys or keys[0] not in obj:
        raise LabelFileError(f"{where}: no label field ({field or ', '.join(HF_FIELDS)}); keys: {sorted(obj)}")
    for key in keys:
        value = obj[key]
        if isinstance(value, str | int) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, list):
            bad = [v for v in value if isinstance(v, bool) or not isinstance(v, str | int)]
            if bad:
                raise LabelFileError(f"{where}: label {bad[0]!r} under {key!r} is not a class name or index")
            return value
    raise LabelFileError(f"{where}: {keys[0]!r} is not a list of labels (got {type(obj[keys[0]]).__name__})")


def read_hf_metadata(
    path: str | os.PathLike, classnames: Sequence[str] | None = None, field: str | None = None
) -> LabelSet:
    """Labels from a Hugging Face imagefolder ``metadata.jsonl``: ``{"file_name": ..., "labels": [...]}`` per line.

    Args:
        path: the JSON-lines file.
        classnames: the class list; labels may then be names or ints. Without it: the sorted names seen.
        field: the label key; None = the first of labels, label, tags, categories holding a list (or one label).
    """
    path = Path(path)
    index = _class_index(classnames, path) if classnames is not None else None
    rows = []
    for lineno, line in enumerate(read_text(path, LabelFileError, "metadata file").split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise LabelFileError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise LabelFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if not isinstance(obj.get("file_name"), str):
            raise LabelFileError(f"{where}: no 'file_name' (a string) in this line")
        labels = _resolve(_hf_labels(obj, field, where), index, where)
        rows.append((lineno, normalise_id(obj["file_name"], path, lineno), labels))
    return _build(rows, classnames, path)


def read_voc_folder(annotations: str | os.PathLike, classnames: Sequence[str] | None = None) -> LabelSet:
    """Labels from a folder of VOC XML files (sorted; difficult objects count as positive).

    The image id is the XML's ``<filename>``, else ``<xml stem>.jpg``. Without ``classnames``: the sorted names seen.
    """
    folder = Path(annotations)
    if not folder.is_dir():
        raise LabelFileError(f"{folder}: annotation folder not found")
    xmls = sorted(folder.glob("*.xml"))
    if not xmls:
        raise LabelFileError(f"{folder}: no *.xml annotation file in this folder")
    index = _class_index(classnames, folder) if classnames is not None else None
    rows, where_of = [], {}
    for xml in tqdm(xmls, desc="reading VOC XML", unit="xml", leave=False):
        names = sorted({name for name, _ in parse_voc_xml(xml)})
        filename = (ET.parse(xml).getroot().findtext("filename") or "").strip() or f"{xml.stem}.jpg"
        image_id = normalise_id(filename, xml)
        if image_id in where_of:
            raise LabelFileError(f"{xml}: image {image_id!r} is also annotated by {where_of[image_id]}")
        where_of[image_id] = xml
        rows.append((None, image_id, _resolve(names, index, str(xml))))
    return _build(rows, classnames, folder)


def read_coco_file(ann_file: str | os.PathLike, classnames: Sequence[str] | None = None) -> LabelSet:
    """Labels from a COCO instances JSON, ids = the images' ``file_name``.

    With ``classnames`` the file's category names must be exactly those classes (matched by name, reordered).
    """
    path = Path(ann_file)
    labels, files = read_coco(path)
    if len(set(labels.ids)) == len(labels.ids):
        names = [files[i] for i in labels.ids]
    else:  # two images share a file-name stem (cat/1.jpg, dog/1.jpg): take the names row by row
        images = sorted(read_json(path, LabelFileError, "annotation file")["images"], key=lambda im: int(im["id"]))
        names = [str(im.get("file_name", f"{int(im['id']):012d}.jpg")) for im in images]
    ids = [normalise_id(n, path) for n in names]
    rows = [(None, i, np.flatnonzero(t == 1).tolist()) for i, t in zip(ids, labels.targets, strict=True)]
    if classnames is None:
        _class_index(labels.classnames, path)
        return _build(rows, labels.classnames, path)
    missing = [n for n in classnames if n not in labels.classnames]
    extra = [n for n in labels.classnames if n not in set(classnames)]
    if missing or extra:
        raise LabelFileError(
            f"{path}: the categories differ from the class list (missing: {missing or 'none'}; "
            f"not in the class list: {extra or 'none'})"
        )
    col = _class_index(classnames, path)
    return _build([(ln, i, [col[labels.classnames[k]] for k in ks]) for ln, i, ks in rows], classnames, path)


# ------------------------------------------------------------------------------------------ format
def detect_format(path: str | os.PathLike) -> str:
    """The format of a label source: a folder of XML -> voc, .json -> coco, .jsonl -> hf, a CSV -> onehot or tags."""
    path = Path(path)
    hint = f"give --format (one of {', '.join(FORMATS)})"
    if path.is_dir():
        if any(path.glob("*.xml")):
            return "voc"
        raise LabelFileError(f"{path}: a folder without *.xml annotation files; {hint}")
    if not path.is_file():
        raise LabelFileError(f"{path}: label file not found")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "coco"
    if suffix == ".jsonl":
        return "hf"
    if suffix in (".xml", ".yaml", ".yml", ".parquet", ".zip", ".tar", ".gz"):
        raise LabelFileError(f"{path}: cannot tell the label format of a {suffix} file; {hint}")
    records = _csv_rows(path, "label file")
    if not records or len(records[0][1]) <= 2:
        return "tags"
    if all(v.strip() in ONEHOT_VALUES for _, rec in records[1:] for v in rec[1:]):
        return "onehot"
    raise LabelFileError(
        f"{path}: a CSV with {len(records[0][1])} columns but values other than 0/1; neither a "
        f"'path,tags' nor a one-hot CSV; {hint}"
    )


def read_tagged(
    path: str | os.PathLike, fmt: str = "auto", classnames: Sequence[str] | None = None, sep: str | None = None
) -> LabelSet:
    """Read a label source in ``fmt`` (one of ``FORMATS``, or 'auto' = :func:`detect_format`)."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "tags":
        return read_tags_csv(path, classnames, sep)
    if fmt == "onehot":
        return read_onehot_csv(path, classnames)
    if fmt == "hf":
        return read_hf_metadata(path, classnames)
    if fmt == "voc":
        return read_voc_folder(path, classnames)
    if fmt == "coco":
        return read_coco_file(path, classnames)
    raise ConfigError(f"--format: unknown format {fmt!r}; valid: auto, {', '.join(FORMATS)}")
