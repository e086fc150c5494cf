"""``cimlic predict``: labels with scores for new images from a trained run.

Scores are the run's calibrated probabilities, labels the classes at or above their thresholds (``calibration.json``,
see ``cimlic.calibration``). Unreadable images are reported (file and reason) and skipped; they are never silently
dropped from the count. Output: JSON lines (one object per image) or CSV (one row per image, one column per class),
and optionally an HTML gallery.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cimlic.config import ConfigError
from cimlic.data.dataset import ImageFileError, load_image
from cimlic.io import atomic_write_text, ensure_dir, read_json

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def collect_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named directly, or found (recursively, sorted) in the folders given."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.exists():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image file or folder")
    if not files:
        raise FileNotFoundError(f"no image found in {[str(i) for i in inputs]}")
    return files


def read_thresholds(path: str | os.PathLike, classnames: Sequence[str], default: np.ndarray) -> np.ndarray:
    """(C,) per-class thresholds from a JSON object {class name: threshold}; classes not listed keep ``default``."""
    path = Path(path)
    table = read_json(path, ConfigError, "thresholds file")
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: expected a JSON object {{class name: threshold}}")
    unknown = sorted(set(table) - set(classnames))
    if unknown:
        raise ConfigError(f"{path}: unknown class name(s) {unknown}; valid: {list(classnames)}")
    out = np.array(default, dtype=np.float64)
    for name, value in table.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"{path}: threshold of {name!r} must be a number in [0, 1], got {value!r}")
        out[list(classnames).index(name)] = float(value)
    return out


def _decode(path: Path, transform) -> torch.Tensor | str:
    try:
        return transform(load_image(path))
    except ImageFileError as err:
        return str(err)


@torch.no_grad()
def score_images(
    model: torch.nn.Module, files: list[Path], transform, device: torch.device, batch_size: int = 32, workers: int = 2
) -> tuple[np.ndarray, list[Path], list[tuple[Path, str]]]:
    """Logits (n_ok, C) of the readable images, their paths, and (path, reason) of the unreadable ones.

    Images are decoded ``workers`` at a time (threads: decoding releases the GIL) and scored ``batch_size`` at a time,
    under a progress bar counting images.
    """
    model.eval()
    logits, ok, failed = [], [], []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, tqdm(total=len(files), desc="predict",
                                                                       unit="img") as bar:  # fmt: skip
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            images = []
            for path, item in zip(chunk, pool.map(lambda f: _decode(f, transform), chunk), strict=True):
                if isinstance(item, str):
                    failed.append((path, item))
                    logger.warning("skipped %s", item)
                else:
                    images.append(item)
                    ok.append(path)
            if images:
                logits.append(model({"image": torch.stack(images).to(device)})["logits"].float().cpu())  # (B, C)
            bar.update(len(chunk))
    scores = torch.cat(logits).numpy() if logits else np.zeros((0, 0), dtype=np.float32)
    return scores, ok, failed


def predicted(row: np.ndarray, thresholds: np.ndarray, top_k: int = 0) -> list[int]:
    """Classes of one image at or above their threshold, highest score first; at most ``top_k`` when > 0."""
    order = [int(k) for k in np.argsort(-row, kind="stable") if row[k] >= thresholds[k]]
    return order[:top_k] if top_k > 0 else order


def format_predictions(
    scores: np.ndarray, files: list[Path], classnames: Sequence[str], thresholds: np.ndarray, fmt: str, top_k: int = 0
) -> str:
    """JSON lines or CSV text of the predictions (``labels``: :func:`predicted`, with their scores)."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["image", "labels", *classnames])
        for path, row in zip(files, scores, strict=True):
            labels = ";".join(classnames[k] for k in predicted(row, thresholds, top_k))
            writer.writerow([str(path), labels, *(f"{p:.6f}" for p in row)])
        return buf.getvalue()
    lines = []
    for path, row in zip(files, scores, strict=True):
        labels = [{"label": classnames[k], "score": round(float(row[k]), 6)} for k in predicted(row, thresholds, top_k)]
        scores_all = {classnames[k]: round(float(row[k]), 6) for k in range(len(classnames))}
        lines.append(json.dumps({"image": str(path), "labels": labels, "scores": scores_all}))
    return "\n".join(lines) + ("\n" if lines else "")


def predict_run(
    run_dir: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    threshold: float | None = None,
    thresholds_file: str | os.PathLike | None = None,
    top_k: int = 0,
    batch_size: int = 32,
    html: str | os.PathLike | None = None,
) -> dict:
    """Score images with a run's selected checkpoint and write ``out`` (.jsonl or .csv) atomically.

    Scores are the run's calibrated probabilities and labels use its per-class thresholds (``calibration.json``,
    written by ``train`` / ``cimlic calibrate``); a run without one scores sigmoid(logit) against 0.5.
    ``threshold`` sets every class's threshold (on those scores: the calibrated probabilities when the run has a
    calibration), ``thresholds_file`` ({class: threshold}) some of them; ``top_k`` keeps
    at most the k highest labels; ``html`` also writes a gallery page (thumbnails, labels, scores).

    Returns:
        {"scored": n, "failed": [{"image", "error"}...], "out": path, "thresholds": where they came from, "html"}.
    """
    from cimlic.apps.calibrate import read_run_calibration
    from cimlic.apps.runner import _resolve_run, load_run, model_transform
    from cimlic.distributed import resolve_device
    from cimlic.metrics import sigmoid

    out = Path(out)
    fmt = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}.get(out.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{out}: output must end in .jsonl or .csv")
    if out.is_dir():
        raise ConfigError(f"{out}: --out names a folder; give a .jsonl or .csv file")
    if html is not None and Path(html).suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"{html}: --html must name an .html file")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--threshold must be in [0, 1], got {threshold}")
    for target in (out, html):  # their folders can be made before any image is scored, or fail now
        if target is not None:
            ensure_dir(Path(target).parent)
    files = collect_images(inputs)
    run_dir = _resolve_run(Path(run_dir))
    cfg, model, meta = load_run(run_dir)
    classnames = list(meta["classnames"])
    cal = read_run_calibration(run_dir, classnames)
    if cal is None:
        logger.warning("%s has no calibration.json (a run without a validation split, or from before thresholds; "
                       "`cimlic calibrate --run %s` chooses them): scores are sigmoid(logit), threshold %s",
                       run_dir, run_dir, 0.5 if threshold is None else threshold)  # fmt: skip
    thresholds = np.array(cal.thresholds) if cal is not None else np.full(len(classnames), 0.5)
    source = "calibration.json" if cal is not None else "0.5"
    if threshold is not None:
        thresholds, source = np.full(len(classnames), float(threshold)), f"--threshold {threshold}"
    if thresholds_file:
        thresholds, source = read_thresholds(thresholds_file, classnames, thresholds), f"{source} + {thresholds_file}"
    device = resolve_device(cfg.train.device)
    transform = model_transform(model, train=False)
    logits, ok, failed = score_images(model.to(device), files, transform, device, batch_size, cfg.train.num_workers)
    logits = logits.reshape(len(ok), len(classnames))  # (n_ok, C), also when no image could be read
    scores = cal.probabilities(logits) if cal is not None else sigmoid(logits)  # (n_ok, C)
    atomic_write_text(out, format_predictions(scores, ok, classnames, thresholds, fmt, top_k))
    if html is not None:
        from cimlic.apps.gallery import write_gallery

        records = [{"image": str(p), "scores": [float(v) for v in row],
                    "labels": [classnames[k] for k in predicted(row, thresholds, top_k)]}
                   for p, row in zip(ok, scores, strict=True)]  # fmt: skip
        write_gallery(html, records, classnames, thresholds.tolist(), title=f"cimlic predict: {run_dir}")
    return {"scored": len(ok), "failed": [{"image": str(p), "error": e} for p, e in failed], "out": str(out),
            "thresholds": source, "calibrated": cal is not None, "html": str(html) if html else None}  # fmt: skip
