"""The few-shot protocol runner on a tiny world: base + K-shot support, novel-class mAP, mean ± std."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cimlic.apps.fewshot import format_fewshot, run_fewshot
from cimlic.config import load_config
from cimlic.data.labels import read_classes, read_label_list, write_label_list
from cimlic.data.splits import build_fewshot_episode, split_base_novel
from glyphs import build_world


@pytest.fixture(scope="module")
def fewshot_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fs")
    build_world(root, n_pool=300, n_test=300, n_max=90, seed=1)
    classes = read_classes(root / "classes.txt")
    balanced = read_label_list(root / "test.txt", classes)  # balanced images: split them into train / test pools
    train, test = balanced.subset(range(200)), balanced.subset(range(200, 300))
    novel_idx = [0, 1]
    base, novel = split_base_novel(train, novel_idx)
    write_label_list(root / "train_base.txt", train.subset(base))
    pool = train.subset(novel)
    for k in (1, 2):
        for e in (1, 2):
            rows = build_fewshot_episode(pool, novel_idx, k, e)
            write_label_list(root / f"train_novel_{k}shot_{e}.txt", pool.subset(rows))
    write_label_list(root / "test_novel.txt", test.subset(split_base_novel(test, novel_idx)[1]))
    return root, {classes[c] for c in novel_idx}


def test_fewshot_protocol(fewshot_world, tmp_path):
    w, novel_names = fewshot_world
    cfg = load_config(None, [
        f"data.classes={w / 'classes.txt'}", f"data.image_root={w / 'images'}", "data.image_pattern={id}.png",
        "model.name=coop", "model.clip_arch=cimlic-tiny-vit", "model.random_init=true", "model.n_ctx=4",
        "train.epochs=1", "train.batch_size=16", "train.num_workers=0", f"train.cache_dir={tmp_path / 'cache'}",
        f"fewshot.base_labels={w / 'train_base.txt'}", f"fewshot.support_dir={w}",
        f"fewshot.test_labels={w / 'test_novel.txt'}", "fewshot.shots=[1, 2]", "fewshot.episodes=2",
    ])  # fmt: skip
    summary = run_fewshot(cfg, tmp_path / "run")
    assert set(summary["shots"]) == {"1", "2"}
    for stats in summary["shots"].values():
        assert len(stats["episodes"]) == 2
        assert stats["mean"] == pytest.approx(np.mean(stats["episodes"])) and stats["std"] >= 0
    ep = json.loads((tmp_path / "run" / "2shot_1" / "eval.json").read_text())
    scored = {c for c, ap in ep["per_class_ap"].items() if ap is not None}
    assert scored == novel_names  # mAP over the novel classes only
    classes = read_classes(w / "classes.txt")
    trained = read_label_list(tmp_path / "run" / "lists" / "2shot_1_train.txt", classes)
    support = read_label_list(w / "train_novel_2shot_1.txt", classes)
    assert trained.ids[-len(support) :] == support.ids  # the saved list is the exact training list
    assert "2-shot novel mAP" in format_fewshot(summary)
    assert json.loads((tmp_path / "run" / "fewshot.json").read_text()) == summary
    again = run_fewshot(cfg, tmp_path / "run", resume=True)  # finished episodes are read back, not retrained
    assert again == summary
    from cimlic.apps.cli import main
    from cimlic.config import save_config

    save_config(cfg, tmp_path / "fs.yaml")
    assert main(["fewshot", "--config", str(tmp_path / "fs.yaml"), "--run-dir", str(tmp_path / "run"), "--resume"]) == 0
    assert main(["fewshot", "--config", str(tmp_path / "fs.yaml"), "--run-dir", str(tmp_path / "run")]) == 2
