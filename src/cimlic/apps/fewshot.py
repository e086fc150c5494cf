"""``cimlic fewshot``: the multi-label few-shot protocol (METHODS §1.3), K shots × episodes, mean ± std.

For every K and episode e the training list is the base-only training images plus the episode's support set
``train_novel_{K}shot_{e}.txt``; the model is tested on the novel-only test images, so the mAP is over the novel
classes (base classes have no positive test image and are excluded). No validation split: the last epoch is
used. Each episode is an ordinary run folder ``<run>/{K}shot_{e}``; ``<run>/lists/{K}shot_{e}_train.txt`` is the
exact image list it was trained on. **[our design]** where METHODS leaves the protocol open (base + support together).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np

from cimlic.config import Config, ConfigError
from cimlic.data.labels import LabelSet, read_classes, read_label_list, write_label_list
from cimlic.io import read_json, write_json
from cimlic.rundir import RunDirError, run_dir_entries, run_lock

logger = logging.getLogger(__name__)


def episode_file(cfg: Config, shots: int, episode: int) -> Path:
    """The support list of episode ``episode`` (1-based) with ``shots`` shots; an error names it when missing."""
    path = Path(cfg.fewshot.support_dir) / f"train_novel_{shots}shot_{episode}.txt"
    if not path.is_file():
        raise ConfigError(f"{path}: support set not found (build episodes with `cimlic split fewshot`)")
    return path


def episode_config(cfg: Config, shots: int, episode: int, run_dir: Path) -> Config:
    """The config of one episode: base + support training list written into its run folder, novel test list."""
    f = cfg.fewshot
    classes = read_classes(cfg.data.classes)
    base = read_label_list(f.base_labels, classes)
    support = read_label_list(episode_file(cfg, shots, episode), classes)
    overlap = sorted(set(base.ids) & set(support.ids))
    if overlap:
        raise ConfigError(f"{f.base_labels}: {len(overlap)} support image(s) are also base images, e.g. {overlap[:3]}")
    train = LabelSet(base.ids + support.ids, np.concatenate([base.targets, support.targets]), classes)
    train_list = run_dir.parent / "lists" / f"{run_dir.name}_train.txt"
    write_label_list(train_list, train, header=f"base + {shots}-shot support, episode {episode}")
    ep = copy.deepcopy(cfg)
    ep.name = f"{cfg.name}/{run_dir.name}"
    ep.data.train_labels = str(train_list)
    ep.data.test_labels, ep.data.val_labels, ep.data.val_fraction = f.test_labels, "", 0.0
    ep.seed = cfg.seed + episode
    return ep


def run_fewshot(cfg: Config, run_dir: str | Path, resume: bool = False) -> dict:
    """Train and test every (K, episode); write ``fewshot.json`` with per-episode and mean ± std novel mAP."""
    from cimlic.apps.runner import train_run

    f, run_dir = cfg.fewshot, Path(run_dir)
    if not (f.base_labels and f.support_dir and f.test_labels):
        raise ConfigError("fewshot.base_labels, fewshot.support_dir and fewshot.test_labels must be set")
    with run_lock(run_dir, "fewshot"):
        run_dir_entries(run_dir, resume)  # never into a non-empty folder unless resuming
        summary = _episodes(cfg, run_dir, resume, train_run)
        write_json(run_dir / "fewshot.json", summary)
    return summary


def _episodes(cfg: Config, run_dir: Path, resume: bool, train_run) -> dict:
    f = cfg.fewshot
    summary: dict = {"shots": {}, "protocol": "base + K-shot support, tested on novel-only images"}
    for shots in f.shots:
        maps = []
        for episode in range(1, f.episodes + 1):
            ep_dir = run_dir / f"{shots}shot_{episode}"
            done = ep_dir / "eval.json"
            if resume and done.is_file():
                result = read_json(done, RunDirError, "episode result")
            else:
                ep_cfg = episode_config(cfg, shots, episode, ep_dir)
                result = train_run(ep_cfg, ep_dir, resume=resume and ep_dir.is_dir() and any(ep_dir.iterdir()))
            maps.append(result["map"])
            logger.info("%d-shot episode %d: novel mAP %.2f", shots, episode, result["map"])
        summary["shots"][str(shots)] = {"episodes": maps, "mean": float(np.mean(maps)), "std": float(np.std(maps))}
    return summary


def format_fewshot(summary: dict) -> str:
    """``K-shot: mean ± std over n episodes`` lines."""
    return "\n".join(
        f"{k}-shot novel mAP: {v['mean']:.2f} ± {v['std']:.2f} over {len(v['episodes'])} episodes"
        for k, v in summary["shots"].items()
    )
