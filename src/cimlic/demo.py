"""``cimlic demo``: the foundation end to end on generated images.

A small "glyphs" world: every class is a fixed random 6×6 colour texture; an image (32×32 PNG on disk)
shows the textures of its classes at random places on a noisy background. The pool is drawn, a
long-tailed training split is built with the same builder as VOC-LT (METHODS §1.2), a balanced test set
is drawn, and a small CNN is trained with several losses and samplers; each run is evaluated with the
long-tailed protocol (total / head / medium / tail mAP). This is a stand-in until the Digits world with a
pre-trained tiny CLIP becomes the demo.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cimlic.config import Config, apply_override
from cimlic.data.dataset import MultiLabelDataset, default_transform
from cimlic.data.labels import (
    LabelSet,
    atomic_write_text,
    read_classes,
    read_label_list,
    write_classes,
    write_label_list,
)
from cimlic.data.samplers import build_sampler
from cimlic.data.splits import build_longtail
from cimlic.losses import build_loss
from cimlic.metrics import Evaluator, format_table

logger = logging.getLogger(__name__)

CLASSES = ["circle", "cross", "dot", "grid", "line", "ring", "star", "wave"]
SIZE, GLYPH = 32, 6
# (name, config overrides) of the demo runs
RUNS = {
    "bce": ["loss.name=bce"],
    "focal": ["loss.name=focal"],
    "asl": ["loss.name=asl"],
    "db_focal+class_aware": ["loss.name=db", "sampler.name=class_aware"],
}


def _render(labels: np.ndarray, glyphs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = rng.normal(0.45, 0.12, (SIZE, SIZE, 3))  # noisy background
    for c in np.flatnonzero(labels):
        y, x = rng.integers(0, SIZE - GLYPH, size=2)
        alpha = rng.uniform(0.35, 0.8)  # faint glyphs make the task hard enough
        img[y : y + GLYPH, x : x + GLYPH] = (1 - alpha) * img[y : y + GLYPH, x : x + GLYPH] + alpha * glyphs[c]
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _draw_labels(n: int, popularity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros((n, len(popularity)), dtype=np.int8)
    for i in range(n):
        k = rng.integers(1, 4)  # 1–3 classes per image
        out[i, rng.choice(len(popularity), size=k, replace=False, p=popularity)] = 1
    return out


def build_world(root: Path, n_pool: int, n_test: int, n_max: int, seed: int) -> None:
    """Write images, ``classes.txt``, ``train.txt`` (long-tailed) and ``test.txt`` (balanced) under ``root``."""
    rng = np.random.default_rng(seed)
    glyphs = rng.uniform(0, 1, (len(CLASSES), GLYPH, GLYPH, 3))
    pool = LabelSet(
        [f"pool_{i:05d}" for i in range(n_pool)], _draw_labels(n_pool, np.full(8, 1 / 8), rng), CLASSES, "demo pool"
    )
    train = pool.subset(build_longtail(pool, n_max=n_max, seed=seed, clamp=True))
    test = LabelSet([f"test_{i:05d}" for i in range(n_test)], _draw_labels(n_test, np.full(8, 1 / 8), rng), CLASSES)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for labels in (train, test):
        for image_id, row in zip(tqdm(labels.ids, desc="rendering", leave=False), labels.targets, strict=True):
            Image.fromarray(_render(row, glyphs, rng)).save(root / "images" / f"{image_id}.png")
    write_classes(root / "classes.txt", CLASSES)
    write_label_list(root / "train.txt", train, header="demo: long-tailed training split")
    write_label_list(root / "test.txt", test, header="demo: balanced test set")


class SmallCNN(nn.Module):
    """Two conv blocks and a linear classifier: enough to learn the glyphs, far from perfect."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
        )  # fmt: skip
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))  # (B, C)


def train_and_eval(root: Path, overrides: list[str], epochs: int, seed: int) -> dict:
    """Train ``SmallCNN`` with the configured loss/sampler; evaluate on the test list."""
    cfg = Config()
    for item in overrides:
        apply_override(cfg, item)
    classes = read_classes(root / "classes.txt")
    train = read_label_list(root / "train.txt", classes)
    test = read_label_list(root / "test.txt", classes)
    torch.manual_seed(seed)
    tf = default_transform(SIZE)
    train_ds = MultiLabelDataset(train, root / "images", "{id}.png", tf)
    test_ds = MultiLabelDataset(test, root / "images", "{id}.png", tf)
    sampler = build_sampler(cfg.sampler, train.targets, seed=seed)
    loader = DataLoader(train_ds, batch_size=32, sampler=sampler, shuffle=sampler is None)
    model = SmallCNN(len(classes))
    criterion = build_loss(cfg.loss, torch.as_tensor(train.class_counts()), len(train))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        criterion.train()
        for batch in loader:
            loss = criterion(model(batch["image"]), batch["target"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    evaluator = Evaluator(len(classes), classes, train_counts=train.class_counts())
    with torch.no_grad():
        for batch in DataLoader(test_ds, batch_size=128):
            evaluator.update(model(batch["image"]), batch["target"])
    return evaluator.compute()


def run_demo(out: Path, quick: bool = False, seed: int = 0) -> dict:
    """Build the glyph world (if missing) under ``out/data``, train every demo run, print and save results."""
    start = time.time()
    root = out / "data"
    n_pool, n_test, n_max, epochs = (1200, 300, 300, 4) if quick else (3000, 1000, 700, 15)
    if not (root / "test.txt").is_file():
        logger.info("building the demo world in %s", root)
        build_world(root, n_pool, n_test, n_max, seed)
    results = {}
    for name, overrides in tqdm(RUNS.items(), desc="demo runs"):
        results[name] = train_and_eval(root, overrides, epochs, seed)
        logger.info("%s\n%s", name, format_table(results[name]))
    header = f"{'run':<24}{'mAP':>8}{'head':>8}{'medium':>8}{'tail':>8}"
    lines = [header] + [
        f"{n:<24}"
        + "".join(f"{r[k]:>8.2f}" if r[k] is not None else f"{'-':>8}" for k in ("map", "head", "medium", "tail"))
        for n, r in results.items()
    ]
    print("\n".join(lines))
    summary = {"seed": seed, "quick": quick, "seconds": round(time.time() - start, 1), "results": results}
    atomic_write_text(out / "eval.json", json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / 'eval.json'} ({summary['seconds']} s)")
    return summary
