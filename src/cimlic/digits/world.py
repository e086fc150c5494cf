"""The Digits world: a miniature long-tailed multi-label benchmark built from scikit-learn's handwritten digits.

``sklearn.datasets.load_digits`` holds 1,797 real 8×8 digit images (10 classes). They are split once, stratified
by digit and with a fixed seed (``HALVES_SEED``, independent of any world or training seed), into two disjoint
halves:

- the **pre-training half** feeds an in-memory corpus of captioned mosaics (:class:`DigitCorpus`: 32×32 px, a 2×2
  grid of 16 px cells, 1–4 distinct digits, bright grey or tinted digits on a dark background, captions such as
  "a photo of the digits three and seven.") on which ``cimlic pretrain-digits`` trains a tiny CLIP;
- the **task half** feeds the benchmark (:func:`build_digits_world`): mosaics in a shifted style (tinted colours,
  lower contrast, clutter strokes, pixel noise, digits scaled 9–16 px), labels = the digit classes present. It is
  split again (stratified) into digit images for the training pool and digit images for the test set, so no test
  image reuses a handwritten digit seen in training.

The training split is cut from a balanced pool by the same builder as VOC-LT (METHODS §1.2) with a scaled n_max;
the world also holds an explicit validation list, a balanced test set, few-shot lists (METHODS §1.3), partial-label
lists (§1.4), captions for LMPT, ``stats.json`` and ``data.yaml`` (the config ``data:`` section).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from cimlic.data.labels import LabelSet, write_classes, write_label_list
from cimlic.data.splits import build_fewshot_episode, build_longtail, partial_labels, split_base_novel
from cimlic.io import atomic_write_text, claim_output_folder, ensure_dir, write_json

logger = logging.getLogger(__name__)

CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NOVEL = ["five", "six", "seven", "eight", "nine"]  # few-shot novel classes (5 base / 5 novel)
HALVES_SEED = 0  # fixed: every world and every pre-trained checkpoint use the same two disjoint halves
SIZE, CELL = 32, 16  # mosaic side and cell side (2×2 cells)
TASK_LABEL_COUNTS = (0.6, 0.3, 0.1)  # P(1, 2, 3 digits) of a task image: ~1.5 labels per image, like VOC
CORPUS_LABEL_COUNTS = (0.25, 0.25, 0.25, 0.25)  # P(1..4 digits) of a pre-training image
MAX_CORPUS_BATCH = 256  # distinct label sets per pre-training batch (385 exist)
PARTIAL_KNOWN = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


# ------------------------------------------------------------------------------------ source digits
@functools.lru_cache(maxsize=1)
def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 scikit-learn digits: images (N, 8, 8) float32 in [0, 1] and labels (N,) int64."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices split per class: the first ``fraction`` of each class's seeded permutation, and the rest (sorted)."""
    rng = np.random.default_rng(seed)
    first, rest = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(fraction * len(idx)))
        first.append(idx[:k])
        rest.append(idx[k:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(rest))


def digit_halves() -> tuple[np.ndarray, np.ndarray]:
    """(pre-training half, task half): disjoint source-digit indices, stratified by digit, fixed seed."""
    _, labels = load_digit_images()
    return stratified_split(labels, 0.5, HALVES_SEED)


def _scaled(indices: np.ndarray, sizes: Sequence[int]) -> dict[int, np.ndarray]:
    """Bilinear upsamplings of the source digits ``indices``: {size: (len(indices), size, size) in [0, 1]}."""
    images, _ = load_digit_images()
    out = {}
    for s in sizes:
        stack = [np.asarray(Image.fromarray(images[i]).resize((s, s), Image.BILINEAR)) for i in indices]
        out[s] = np.clip(np.stack(stack), 0.0, 1.0)
    return out


def caption(classes: Sequence[int]) -> str:
    """The caption of a label set: "a photo of the digit three." / "a photo of the digits three, five and seven."."""
    names = [CLASSES[c] for c in sorted(classes)]
    if len(names) == 1:
        return f"a photo of the digit {names[0]}."
    return f"a photo of the digits {', '.join(names[:-1])} and {names[-1]}."


# ------------------------------------------------------------------------------------------ rendering
@dataclass(frozen=True)
class Style:
    """How a mosaic is drawn (each image draws its own values from these ranges)."""

    sizes: tuple[int, ...]  # digit side in px (upsampled from 8 px; at a random place in its 16 px cell)
    background: tuple[float, float]  # per-channel background level range
    colour: float  # probability of a tinted image (else grey)
    delta: tuple[float, float]  # per-channel step from the background to the digit colour
    contrast: tuple[float, float]  # digit opacity range
    noise: tuple[float, float]  # range of the pixel-noise standard deviation
    clutter: bool  # add 1–3 faint random strokes or dots


# pre-training: mostly grey, high contrast, little noise, no clutter; task: tinted, fainter, noisier, cluttered,
# digits scaled over a wider range (the "shifted style")
CORPUS_STYLE = Style(sizes=(12, 13, 14, 15, 16), background=(0.0, 0.3), colour=0.5, delta=(0.5, 0.9),
                     contrast=(0.8, 1.0), noise=(0.0, 0.03), clutter=False)  # fmt: skip
TASK_STYLE = Style(sizes=tuple(range(9, 17)), background=(0.05, 0.5), colour=1.0, delta=(0.35, 0.75),
                   contrast=(0.5, 1.0), noise=(0.02, 0.06), clutter=True)  # fmt: skip


class MosaicRenderer:
    """Draws 32×32 mosaics (2×2 cells of 16 px) of given digit classes from a fixed set of source digits."""

    def __init__(self, sources: np.ndarray, style: Style) -> None:
        _, labels = load_digit_images()
        self.sources = np.asarray(sources)
        self.style = style
        self.bank = _scaled(self.sources, style.sizes)
        self.by_class = [np.flatnonzero(labels[self.sources] == c) for c in range(len(CLASSES))]  # rows of bank

    def render(self, classes: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
        """(32, 32, 3) uint8 mosaic of ``classes`` (one random source digit each) and the source indices used."""
        st = self.style
        tinted = rng.random() < st.colour
        bg = rng.uniform(*st.background, 3 if tinted else 1) * np.ones(3)
        away = np.where(bg < 0.5, 1.0, -1.0)  # each channel moves away from the background's level
        fg = np.clip(bg + away * rng.uniform(*st.delta, 3 if tinted else 1), 0.0, 1.0)
        img = np.ones((SIZE, SIZE, 3), dtype=np.float32) * bg
        if st.clutter:
            img = _clutter(img, rng)
        contrast = rng.uniform(*st.contrast)
        used = []
        for cls, cell in zip(classes, rng.permutation(4)[: len(classes)], strict=True):
            s = int(rng.choice(st.sizes))
            row = int(rng.choice(self.by_class[cls]))
            alpha = self.bank[s][row][..., None] * contrast  # (s, s, 1)
            y = CELL * (cell // 2) + int(rng.integers(0, CELL - s + 1))
            x = CELL * (cell % 2) + int(rng.integers(0, CELL - s + 1))
            img[y : y + s, x : x + s] = (1 - alpha) * img[y : y + s, x : x + s] + alpha * fg
            used.append(int(self.sources[row]))
        img = img + rng.normal(0.0, rng.uniform(*st.noise), img.shape)
        return (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8), used


def _clutter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blend 1–3 faint random strokes or dots (not digits) into ``img`` (H, W, 3) in [0, 1]."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = (int(v) for v in rng.integers(0, SIZE, 2))
        if rng.random() < 0.5:
            dx, dy = (int(v) for v in rng.integers(-8, 9, 2))
            draw.line((x0, y0, x0 + dx, y0 + dy), fill=255, width=1)
        else:
            r = int(rng.integers(1, 3))
            draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=255)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0 * rng.uniform(0.2, 0.5)
    return (1 - alpha) * img + alpha * rng.uniform(0.0, 1.0, 3)


# --------------------------------------------------------------------------------- pre-training corpus
class DigitCorpus:
    """In-memory captioned mosaics (``CORPUS_STYLE``) from the pre-training half; nothing is written to disk.

    Each batch holds distinct label sets, so no caption appears twice and the contrastive targets have no false
    negatives.
    """

    def __init__(self, sources: np.ndarray | None = None, style: Style | None = None) -> None:
        self.renderer = MosaicRenderer(digit_halves()[0] if sources is None else sources, style or CORPUS_STYLE)

    @property
    def sources(self) -> np.ndarray:
        return self.renderer.sources

    def sample_label_sets(self, n: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
        """``n`` distinct label sets; the number of digits follows ``CORPUS_LABEL_COUNTS``."""
        if n > MAX_CORPUS_BATCH:
            raise ValueError(f"a corpus batch holds at most {MAX_CORPUS_BATCH} distinct label sets, not {n}")
        seen: set[tuple[int, ...]] = set()
        out: list[tuple[int, ...]] = []
        while len(out) < n:  # rejection sampling of unseen sets (385 exist: 10 + 45 + 120 + 210)
            k = int(rng.choice(len(CORPUS_LABEL_COUNTS), p=CORPUS_LABEL_COUNTS)) + 1
            classes = tuple(sorted(int(c) for c in rng.choice(len(CLASSES), size=k, replace=False)))
            if classes not in seen:
                seen.add(classes)
                out.append(classes)
        return out

    def batch(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, ...]], list[str]]:
        """``n`` mosaics (n, 32, 32, 3) uint8 with their label sets and captions."""
        sets = self.sample_label_sets(n, rng)
        images = np.stack([self.renderer.render(s, rng)[0] for s in sets])
        return images, sets, [caption(s) for s in sets]


def draw_label_sets(n: int, probs: Sequence[float], rng: np.random.Generator, balanced: bool = False) -> np.ndarray:
    """(n, 10) int8 multi-hot rows of k distinct classes, P(k) = ``probs[k - 1]``.

    Classes are uniform at random, or (``balanced``) the k classes seen least so far, ties broken at random, so every
    class ends with the same count up to one.
    """
    out = np.zeros((n, len(CLASSES)), dtype=np.int8)
    counts = np.zeros(len(CLASSES), dtype=np.int64)
    ks = rng.choice(len(probs), size=n, p=probs) + 1
    for i, k in enumerate(ks):
        if balanced:
            chosen = np.lexsort((rng.random(len(CLASSES)), counts))[:k]  # fewest first, random among equals
        else:
            chosen = rng.choice(len(CLASSES), size=k, replace=False)
        out[i, chosen] = 1
        counts[chosen] += 1
    return out


# ------------------------------------------------------------------------------------------- the world
def _render_split(renderer: MosaicRenderer, labels: LabelSet, seed: int, code: int, image_dir: Path) -> dict:
    """Render and write every image of ``labels``; returns {image id: source-digit indices}."""
    used = {}
    for row, (image_id, target) in enumerate(zip(labels.ids, labels.targets, strict=True)):
        rng = np.random.default_rng([seed, code, row])  # an image depends only on (seed, split, row)
        img, sources = renderer.render(np.flatnonzero(target == 1).tolist(), rng)
        Image.fromarray(img).save(image_dir / f"{image_id}.png")
        used[image_id] = sources
    return used


def _write_fewshot(out: Path, pool: LabelSet, test: LabelSet, novel: list[int], shots: Sequence[int],
                   episodes: int, seed: int) -> dict:  # fmt: skip
    """Base/novel lists of the pool and the test set, and K-shot episodes from the novel-only pool (METHODS §1.3)."""
    stats: dict = {"novel": [CLASSES[c] for c in novel]}
    for split, labels in (("train", pool), ("test", test)):
        base, novel_rows = split_base_novel(labels, novel)
        write_label_list(out / f"{split}_base.txt", labels.subset(base), header=f"digits {split}: base-only images")
        write_label_list(out / f"{split}_novel.txt", labels.subset(novel_rows), header=f"digits {split}: novel-only")
        stats[f"{split}_base"], stats[f"{split}_novel"] = len(base), len(novel_rows)
        if split == "train":
            novel_pool = labels.subset(novel_rows)
    for k in shots:
        for episode in range(1, episodes + 1):
            rows = build_fewshot_episode(novel_pool, novel, k, seed=seed * 1000 + episode)
            write_label_list(out / f"train_novel_{k}shot_{episode}.txt", novel_pool.subset(rows),
                             header=f"digits: {k}-shot support set, episode {episode}, seed {seed}")  # fmt: skip
    stats |= {"shots": list(shots), "episodes": episodes}
    return stats


def _write_partial(out: Path, train: LabelSet, seed: int) -> dict:
    """``partial_p{p}.txt``: the training list (same order) with each entry known with probability p (METHODS §1.4)."""
    known = {}
    for p in PARTIAL_KNOWN:
        masked = LabelSet(train.ids, partial_labels(train.targets, p, seed=seed * 100 + round(10 * p)), CLASSES)
        head = f"digits: partial labels of train.txt, known={p}, seed {seed}; third column = unknown classes"
        write_label_list(out / f"partial_p{p}.txt", masked, header=head)
        known[str(p)] = round(masked.known_fraction(), 4)
    return known


def build_digits_world(
    out_dir: str | os.PathLike,
    seed: int = 0,
    n_pool: int = 2500,
    n_val: int = 250,
    n_test: int = 600,
    n_max: int = 500,
    shots: Sequence[int] = (1, 5),
    episodes: int = 10,
    head_threshold: int = 100,
    tail_threshold: int = 20,
) -> dict:
    """Write the Digits world under ``out_dir`` (images, label lists, captions, few-shot and partial lists).

    Args:
        out_dir: output folder (created).
        seed: seed of every draw (task digit split, labels, rendering, long tail, validation, episodes, masks).
        n_pool: images of the balanced pool the long-tailed training split is cut from.
        n_val: validation images, drawn from the pool images outside the training split.
        n_test: balanced test images (from digit images never used in training).
        n_max: target count of the most frequent class for the long-tail builder (METHODS §1.2; 800 on VOC-LT).
        shots, episodes: few-shot support sets: K values and episodes per K.
        head_threshold, tail_threshold: group thresholds (head n_c >= head, tail n_c < tail), written to data.yaml.

    Returns:
        The statistics written to ``stats.json``.
    """
    claim_output_folder(out_dir, f"cimlic digits --seed {seed}")
    from cimlic.data.prepare import split_stats

    out = Path(out_dir)
    image_dir = out / "images"
    ensure_dir(image_dir)
    _, digit_labels = load_digit_images()
    pretrain_half, task_half = digit_halves()
    task_train, task_test = (task_half[i] for i in stratified_split(digit_labels[task_half], 2 / 3, seed))
    rng = np.random.default_rng([seed, 0])
    pool = LabelSet([f"pool_{i:05d}" for i in range(n_pool)], draw_label_sets(n_pool, TASK_LABEL_COUNTS, rng),
                    CLASSES, source="digits pool")  # fmt: skip
    test = LabelSet([f"test_{i:05d}" for i in range(n_test)], draw_label_sets(n_test, TASK_LABEL_COUNTS, rng, True),
                    CLASSES, source="digits test")  # fmt: skip
    train_rows = build_longtail(pool, n_max=n_max, seed=seed, clamp=True)
    chosen = set(train_rows)
    rest = [i for i in range(n_pool) if i not in chosen]
    val_rows = sorted(np.random.default_rng([seed, 1]).choice(rest, size=min(n_val, len(rest)), replace=False))
    train, val = pool.subset(train_rows), pool.subset(val_rows)

    used = _render_split(MosaicRenderer(task_train, TASK_STYLE), pool, seed, 1, image_dir)
    used |= _render_split(MosaicRenderer(task_test, TASK_STYLE), test, seed, 2, image_dir)
    write_classes(out / "classes.txt", CLASSES)
    write_label_list(out / "pool.txt", pool, header=f"digits: balanced pool (seed {seed})")
    write_label_list(
        out / "train.txt", train, header=f"digits: long-tailed split of pool.txt (n_max={n_max}, seed {seed})"
    )
    write_label_list(out / "val.txt", val, header="digits: validation images (pool images outside train.txt)")
    write_label_list(out / "test.txt", test, header="digits: balanced test set (digit images unseen in training)")
    captions = [f"{i}\t{caption(pool.positives(r))}" for r, i in enumerate(pool.ids)]
    atomic_write_text(out / "train_captions.txt", "\n".join(captions) + "\n")
    novel = [CLASSES.index(n) for n in NOVEL]
    fewshot = _write_fewshot(out / "fewshot", pool, test, novel, shots, episodes, seed)
    known = _write_partial(out / "partial", train, seed)
    sources = {"halves_seed": HALVES_SEED, "pretrain": pretrain_half.tolist(), "task_train": task_train.tolist(),
               "task_test": task_test.tolist(), "images": used}  # fmt: skip
    write_json(out / "sources.json", sources, indent=None)

    stats = split_stats(train, test, head_threshold, tail_threshold) | {
        "seed": seed,
        "builder": {"n_max": n_max, "n_min": 1, "shape": 6.0, "clamp": True, "pool_images": n_pool},
        "val_images": len(val),
        "labels_per_image": {"train": _mean_labels(train), "test": _mean_labels(test)},
        "test_positive_rate": round(float((test.targets == 1).mean()), 4),
        "source_digits": {
            "pretrain_half": len(pretrain_half),
            "task_train": len(task_train),
            "task_test": len(task_test),
        },  # fmt: skip
        "fewshot": fewshot,
        "partial_known_fraction": known,
    }
    write_json(out / "stats.json", stats)
    _write_data_yaml(out, seed, head_threshold, tail_threshold)
    g = stats["groups"]
    logger.info("digits world in %s: train %d (head/medium/tail %d/%d/%d), val %d, test %d images",
                out, len(train), g["head"], g["medium"], g["tail"], len(val), len(test))  # fmt: skip
    return stats


def _write_data_yaml(out: Path, seed: int, head_threshold: int, tail_threshold: int) -> None:
    """``data.yaml``: the config ``data:`` section of the world (a valid config file on its own)."""
    data_cfg = {
        "name": "digits", "classes": str(out / "classes.txt"), "train_labels": str(out / "train.txt"),
        "val_labels": str(out / "val.txt"), "test_labels": str(out / "test.txt"), "image_root": str(out / "images"),
        "image_pattern": "{id}.png", "image_size": SIZE, "head_threshold": head_threshold,
        "tail_threshold": tail_threshold,
    }  # fmt: skip
    note = (
        f"# The Digits world (cimlic digits --out {out} --seed {seed}).\n"
        f"# LMPT: add  captions: {out / 'train_captions.txt'}\n"
        f"# Partial labels: add  partial_mask: {out / 'partial' / 'partial_p0.5.txt'}  (p = 0.1..0.9)\n"
    )
    atomic_write_text(out / "data.yaml", note + yaml.safe_dump({"data": data_cfg}, sort_keys=False))


def _mean_labels(labels: LabelSet) -> float:
    return round(float((labels.targets == 1).sum(axis=1).mean()), 3)
