"""``cimlic predict``: labels with scores for new images from a trained run.

Unreadable images are reported (file and reason) and skipped; they are never silently dropped from the
count. Output: JSON lines (one object per image) or CSV (one row per image, one column per class).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cimlic.config import ConfigError
from cimlic.data.dataset import ImageFileError, load_image
from cimlic.io import atomic_write_text, read_json

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


def read_thresholds(path: str | os.PathLike, classnames: Sequence[str]) -> np.ndarray:
    """(C,) per-class thresholds from a JSON object {class name: threshold}; classes not listed keep 0.5."""
    path = Path(path)
    table = read_json(path, ConfigError, "thresholds file")
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: expected a JSON object {{class name: threshold}}")
    unknown = sorted(set(table) - set(classnames))
    if unknown:
        raise ConfigError(f"{path}: unknown class name(s) {unknown}; valid: {list(classnames)}")
    out = np.full(len(classnames), 0.5)
    for name, value in table.items():
        if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"{path}: threshold of {name!r} must be a number in [0, 1], got {value!r}")
        out[list(classnames).index(name)] = float(value)
    return out


@torch.no_grad()
def score_images(model: torch.nn.Module, files: list[Path], transform, device: torch.device, batch_size: int = 32):
    """Probabilities (n_ok, C) of the readable images, their paths, and (path, reason) of the unreadable ones."""
    model.eval()
    probs, ok, failed = [], [], []
    for start in tqdm(range(0, len(files), batch_size), desc="predict", unit="batch", leave=False):
        images = []
        for path in files[start : start + batch_size]:
            try:
                images.append(transform(load_image(path)))
                ok.append(path)
            except ImageFileError as err:
                failed.append((path, str(err)))
                logger.warning("skipped %s", err)
        if images:
            logits = model({"image": torch.stack(images).to(device)})["logits"].float()  # (B, C)
            probs.append(torch.sigmoid(logits).cpu())
    scores = torch.cat(probs).numpy() if probs else np.zeros((0, 0))
    return scores, ok, failed


def format_predictions(
    scores: np.ndarray, files: list[Path], classnames: Sequence[str], thresholds: np.ndarray, fmt: str
) -> str:
    """JSON lines or CSV text of the predictions (labels = classes whose probability reaches the threshold)."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["image", "labels", *classnames])
        for path, row in zip(files, scores, strict=True):
            labels = ";".join(c for c, p, t in zip(classnames, row, thresholds, strict=True) if p >= t)
            writer.writerow([str(path), labels, *(f"{p:.6f}" for p in row)])
        return buf.getvalue()
    lines = []
    for path, row in zip(files, scores, strict=True):
        order = np.argsort(-row)
        labels = [{"label": classnames[k], "score": round(float(row[k]), 6)} for k in order if row[k] >= thresholds[k]]
        scores_all = {classnames[k]: round(float(row[k]), 6) for k in range(len(classnames))}
        lines.append(json.dumps({"image": str(path), "labels": labels, "scores": scores_all}))
    return "\n".join(lines) + ("\n" if lines else "")


def predict_run(
    run_dir: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    threshold: float = 0.5,
    thresholds_file: str | os.PathLike | None = None,
) -> dict:
    """Score images with a run's selected checkpoint and write ``out`` (.jsonl or .csv) atomically.

    Returns:
        {"scored": n, "failed": [{"image", "error"}...], "out": path}.
    """
    from cimlic.apps.runner import load_run, model_transform
    from cimlic.distributed import resolve_device

    out = Path(out)
    fmt = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}.get(out.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{out}: output must end in .jsonl or .csv")
    if out.is_dir():
        raise ConfigError(f"{out}: --out names a folder; give a .jsonl or .csv file")
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--threshold must be in [0, 1], got {threshold}")
    files = collect_images(inputs)
    cfg, model, meta = load_run(run_dir)
    classnames = list(meta["classnames"])
    thresholds = (
        read_thresholds(thresholds_file, classnames) if thresholds_file else np.full(len(classnames), threshold)
    )
    device = resolve_device(cfg.train.device)
    scores, ok, failed = score_images(model.to(device), files, model_transform(model, train=False), device)
    atomic_write_text(out, format_predictions(scores, ok, classnames, thresholds, fmt))
    return {"scored": len(ok), "failed": [{"image": str(p), "error": e} for p, e in failed], "out": str(out)}
