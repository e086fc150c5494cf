"""The Digits world (``cimlic digits``) and the tiny CLIP pre-training on it (``cimlic pretrain-digits``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cimlic.apps.cli import main
from cimlic.config import load_config
from cimlic.data.captions import read_captions
from cimlic.data.labels import class_groups, read_classes, read_label_list
from cimlic.digits import pretrain
from cimlic.digits.world import CLASSES, NOVEL, PARTIAL_KNOWN, DigitCorpus, digit_halves, load_digit_images
from cimlic.models.clip import load_clip
from runs import chance_map, sklearn_map


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "w"
    assert main(["digits", "--out", str(out), "--seed", "0"]) == 0
    return out


def read(world: Path, name: str):
    return read_label_list(world / name, read_classes(world / "classes.txt"))


def test_world_files_parse(world):
    assert read_classes(world / "classes.txt") == CLASSES
    pool, train, val, test = (read(world, f"{n}.txt") for n in ("pool", "train", "val", "test"))
    assert len(pool) == 2500 and len(test) == 600 and len(val) == 250
    assert set(train.ids) <= set(pool.ids) and set(val.ids) <= set(pool.ids)
    assert not set(train.ids) & set(val.ids) and not set(test.ids) & set(pool.ids)
    for labels in (pool, test):
        k = (labels.targets == 1).sum(axis=1)
        assert k.min() >= 1 and k.max() <= 3  # 1–3 digits per task image
    for image_id in train.ids + val.ids + test.ids:
        assert (world / "images" / f"{image_id}.png").is_file()
    cfg = load_config(world / "data.yaml")  # the data section is a valid config as it stands
    assert cfg.data.name == "digits" and Path(cfg.data.val_labels) == world / "val.txt"
    assert read_captions(world / "train_captions.txt", train.ids)[0].startswith("a photo of the digit")
    stats = json.loads((world / "stats.json").read_text())
    assert stats["train_images"] == len(train) and stats["test_positive_rate"] == pytest.approx(0.15, abs=0.02)


def test_training_split_is_long_tailed(world):
    cfg = load_config(world / "data.yaml")
    counts = read(world, "train.txt").class_counts()
    groups = class_groups(counts, head=cfg.data.head_threshold, tail=cfg.data.tail_threshold)
    assert {g: int((groups == g).sum()) > 0 for g in ("head", "medium", "tail")} == dict.fromkeys(
        ("head", "medium", "tail"), True
    )
    assert counts.max() >= 150 and counts.min() <= 10  # a few hundred at the head, a handful at the tail
    test_counts = read(world, "test.txt").class_counts()
    assert test_counts.max() - test_counts.min() <= 1  # the test set is balanced


def test_halves_are_disjoint(world):
    images, labels = load_digit_images()
    assert images.shape == (1797, 8, 8)
    pre, task = digit_halves()
    assert not set(pre) & set(task) and len(pre) + len(task) == 1797
    assert abs(np.bincount(labels[pre]) - np.bincount(labels[task])).max() <= 1  # stratified by digit
    sources = json.loads((world / "sources.json").read_text())
    assert sources["pretrain"] == pre.tolist()
    train_src, test_src = set(sources["task_train"]), set(sources["task_test"])
    assert not train_src & test_src and train_src | test_src == set(task.tolist())
    for image_id, used in sources["images"].items():
        assert set(used) <= (test_src if image_id.startswith("test_") else train_src)
    corpus = DigitCorpus()
    assert set(corpus.sources.tolist()) == set(pre.tolist())
    rng = np.random.default_rng(0)
    for classes in corpus.sample_label_sets(20, rng):
        _, used = corpus.renderer.render(classes, rng)
        assert set(used) <= set(pre.tolist()) and [labels[i] for i in used] == list(classes)


@pytest.mark.slow
def test_world_is_deterministic(world, tmp_path):
    again = tmp_path / "again"
    assert main(["digits", "--out", str(again), "--seed", "0"]) == 0
    files = sorted(p.relative_to(world) for p in world.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    changed = [f for f in files if f.name != "data.yaml" and (world / f).read_bytes() != (again / f).read_bytes()]
    assert not changed, changed[:5]
    other = tmp_path / "seed1"
    assert main(["digits", "--out", str(other), "--seed", "1"]) == 0
    assert (other / "train.txt").read_bytes() != (world / "train.txt").read_bytes()


def test_fewshot_lists(world):
    novel = [CLASSES.index(n) for n in NOVEL]
    base = [c for c in range(len(CLASSES)) if c not in novel]
    for split in ("train", "test"):
        assert not (read(world, f"fewshot/{split}_base.txt").targets[:, novel] == 1).any()
        assert not (read(world, f"fewshot/{split}_novel.txt").targets[:, base] == 1).any()
    for k in (1, 5):
        files = sorted((world / "fewshot").glob(f"train_novel_{k}shot_*.txt"))
        assert len(files) == 10
        for f in files:
            episode = read(world, f"fewshot/{f.name}")
            assert (episode.targets[:, novel] == 1).sum(axis=0).tolist() == [k] * len(novel)


def test_partial_lists(world):
    train = read(world, "train.txt")
    for p in PARTIAL_KNOWN:
        masked = read(world, f"partial/partial_p{p}.txt")
        assert masked.ids == train.ids  # same order: usable as data.partial_mask
        known = masked.targets != -1
        assert known.mean() == pytest.approx(p, abs=0.04)  # about 1 - p of the entries are hidden
        assert (masked.targets[known] == train.targets[known]).all()


def test_zeroshot_run_on_the_world(world, tmp_path):
    """`cimlic train` works on the world unchanged (random tiny CLIP, zero-shot: evaluation only)."""
    run = tmp_path / "run"
    sets = ["model.name=zeroshot", "model.clip_arch=cimlic-digits-vit", "model.random_init=true", "train.epochs=0",
            "train.num_workers=0", f"train.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    argv = ["train", "--config", str(world / "data.yaml"), "--run-dir", str(run)]
    assert main(argv + [x for s in sets for x in ("--set", s)]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["num_images"] == 600 and result["map"] == pytest.approx(sklearn_map(run), abs=1e-6)
    chance = chance_map(world / "test.txt", world / "classes.txt")  # about 15: a random CLIP scores near it
    assert abs(result["map"] - chance) < 8, (result["map"], chance)


@pytest.mark.slow
# ------------------------------------------------------------------------------------------ pre-training
def test_pretrain_learns_and_is_deterministic(tmp_path):
    recipe = pretrain.QUICK_RECIPE  # 40 steps of 16 pairs
    a = pretrain.pretrain_digits(tmp_path / "a", seed=0, recipe=recipe, progress=False)
    b = pretrain.pretrain_digits(tmp_path / "b", seed=0, recipe=recipe, progress=False)
    losses_a = json.loads(a.with_suffix(".json").read_text())["losses"]
    losses_b = json.loads(b.with_suffix(".json").read_text())["losses"]
    assert len(losses_a) == recipe.steps and losses_a == losses_b  # same seed, same steps
    first, last = np.mean(losses_a[:5]), np.mean(losses_a[-10:])
    assert last < first and last < math.log(recipe.batch_size) - 0.2  # it learns: below the chance level log(B)
    clip = load_clip(pretrain.ARCH, checkpoint=a)  # the normal checkpoint path
    assert clip.image_size == 32 and clip.source == str(a)
    with torch.no_grad():
        assert clip.encode_image(torch.zeros(2, 3, 32, 32)).shape == (2, clip.embed_dim)
    meta = json.loads(a.with_suffix(".json").read_text())
    assert meta["seed"] == 0 and meta["recipe"]["steps"] == recipe.steps and meta["model_config"]["vision_cfg"]


def test_pretrain_cache(tmp_path, monkeypatch, capsys):
    argv = ["pretrain-digits", "--out", str(tmp_path), "--seed", "3", "--quick", "--steps", "5"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    path = Path(first.split("checkpoint: ")[1].split()[0])
    assert path.is_file() and "final loss" in first

    def boom(*args, **kwargs):
        raise AssertionError("retrained although the checkpoint is cached")

    monkeypatch.setattr(pretrain, "train_contrastive", boom)
    assert main(argv) == 0
    assert f"checkpoint: {path} (found in the cache)" in capsys.readouterr().out
    recipe = pretrain.replace(pretrain.QUICK_RECIPE, steps=5)
    assert pretrain.pretrain_digits(tmp_path, seed=3, recipe=recipe) == path
    assert pretrain.checkpoint_path(tmp_path, pretrain.ARCH, recipe, seed=4) != path  # another seed, another key
