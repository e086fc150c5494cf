"""A generated "glyphs" world for the tests: small PNG images with up to three class textures.

Every class is a fixed random 6×6 colour texture; an image (32×32 PNG on disk) shows the textures of its
classes at random places on a noisy background. The pool is drawn, a long-tailed training split is built
with the same builder as VOC-LT (METHODS §1.2) and a balanced test set is drawn. It is fast to build and
needs no dataset (a test fixture); the Digits world (``cimlic.digits.world``) is the realistic embedded benchmark.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cimlic.data.labels import LabelSet, write_classes, write_label_list
from cimlic.data.splits import build_longtail

CLASSES = ["circle", "cross", "dot", "grid", "line", "ring", "star", "wave"]
SIZE, GLYPH = 32, 6


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
